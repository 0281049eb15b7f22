"""What an object is before it is decoded: extension, format, size and EXIF orientation, from its
header alone, so that a decompression bomb or a file of the wrong kind never reaches a decoder."""

from __future__ import annotations

import io
import os
from typing import NamedTuple

from crackscale.config.score import ScoreConfig
from crackscale.imaging.tfdecode import clean_error

FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}


class Header(NamedTuple):
    """What the header says: EXIF orientation 1..8 (0 on error), the error ("" if the object may be
    decoded), the PIL format, and the upright width and height (orientation applied)."""

    orientation: int
    error: str
    format: str
    width: int = 0
    height: int = 0


def header(data: bytes, uri: str, cfg: ScoreConfig) -> Header:
    """The object's ``Header``, from its header only (no pixels decoded)."""
    from PIL import Image, UnidentifiedImageError

    ext = os.path.splitext(uri)[1].lower()
    allowed = {FORMATS[e.lower()] for e in cfg.extensions if e.lower() in FORMATS}
    if ext not in {e.lower() for e in cfg.extensions}:
        return Header(0, f"unsupported: extension {ext or '(none)'}", "")
    if not data:
        return Header(0, "empty file", "")
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only: format, size, EXIF
            fmt, (w, h) = im.format, im.size
            fmt = "JPEG" if fmt == "MPO" else fmt  # multi-picture JPEG (cameras, phones): its first picture
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except UnidentifiedImageError:
        return Header(0, "decode: not an image", "")
    except Image.DecompressionBombError as e:  # PIL's own guard (> 2 × its MAX_IMAGE_PIXELS)
        return Header(0, f"too large: {clean_error(e)}", "")
    except Exception as e:  # PIL raises many kinds on garbage headers
        return Header(0, f"decode: {clean_error(e)}", "")
    if fmt not in allowed:
        return Header(0, f"unsupported: format {fmt}", "")
    if w * h > cfg.max_pixels:
        return Header(0, f"too large: {w}x{h} pixels > max_pixels {cfg.max_pixels}", "")
    orientation = orientation if 1 <= orientation <= 8 else 1
    if fmt == "TIFF":  # Pillow's TIFF loader turns the picture upright itself (and reports that size)
        orientation = 1
    if orientation >= 5:  # a quarter turn: the upright picture is h wide
        w, h = h, w
    return Header(orientation, "", str(fmt), w, h)
