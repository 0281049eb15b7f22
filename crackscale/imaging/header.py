"""What an object is before it is decoded: extension, format, size and EXIF orientation, from its
header alone, so that a decompression bomb or a file of the wrong kind never reaches a decoder."""

from __future__ import annotations

import io
import os

from crackscale.config.score import ScoreConfig
from crackscale.imaging.tfdecode import clean_error

FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF"}


def header(data: bytes, uri: str, cfg: ScoreConfig) -> tuple[int, str, str]:
    """(EXIF orientation 1..8, "", PIL format) if the object may be decoded, else (0, error, "");
    header only."""
    from PIL import Image, UnidentifiedImageError

    ext = os.path.splitext(uri)[1].lower()
    allowed = {FORMATS[e.lower()] for e in cfg.extensions if e.lower() in FORMATS}
    if ext not in {e.lower() for e in cfg.extensions}:
        return 0, f"unsupported: extension {ext or '(none)'}", ""
    if not data:
        return 0, "empty file", ""
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only: format, size, EXIF
            fmt, (w, h) = im.format, im.size
            fmt = "JPEG" if fmt == "MPO" else fmt  # multi-picture JPEG (cameras, phones): its first picture
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except UnidentifiedImageError:
        return 0, "decode: not an image", ""
    except Image.DecompressionBombError as e:  # PIL's own guard (> 2 × its MAX_IMAGE_PIXELS)
        return 0, f"too large: {clean_error(e)}", ""
    except Exception as e:  # PIL raises many kinds on garbage headers
        return 0, f"decode: {clean_error(e)}", ""
    if fmt not in allowed:
        return 0, f"unsupported: format {fmt}", ""
    if w * h > cfg.max_pixels:
        return 0, f"too large: {w}x{h} pixels > max_pixels {cfg.max_pixels}", ""
    return (orientation if 1 <= orientation <= 8 else 1), "", str(fmt)
