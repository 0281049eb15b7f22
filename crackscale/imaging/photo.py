"""Whole photos at full resolution: decoded to upright uint8 RGB for cutting into tiles, and the
formats TensorFlow does not decode (TIFF, WebP) for any size. JPEGs go through libjpeg-turbo with
TensorFlow's settings (``imaging.jpeg``); everything else through Pillow, with 16-bit and
grey-scale images brought to 8-bit RGB. Resizing uses the same bilinear kernel as training
(``imaging.resize``; TensorFlow's own when the model was trained with an antialiased resize)."""

from __future__ import annotations

import io
import warnings

import numpy as np

from crackscale.errors import first_line
from crackscale.imaging import jpeg


def decode_rgb(data: bytes, fmt: str, orientation: int = 1) -> np.ndarray:
    """Upright uint8 [h, w, 3]; raises ValueError on a damaged or truncated file."""
    if fmt == "JPEG":
        try:
            img = jpeg.decode_full(data)
        except Exception:  # noqa: BLE001 - a warning from libjpeg: Pillow decides
            img = _pillow(data)
    else:
        img = _pillow(data)
    return np.ascontiguousarray(jpeg.orient(img, orientation))


def decode_file(data: bytes) -> np.ndarray:
    """An encoded image of any format as upright uint8 RGB, its format and EXIF orientation read
    from its own header (for callers without a scoring ``Header``); raises ValueError or OSError."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        fmt = "JPEG" if im.format == "MPO" else str(im.format)
        orientation = int(im.getexif().get(0x0112, 1))
    return decode_rgb(data, fmt, orientation)


def _pillow(data: bytes) -> np.ndarray:
    """Pillow's pixels as uint8 RGB (orientation not applied: the caller knows it from the header)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # the header check already applied max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return _to_rgb8(im)
    except (OSError, SyntaxError, ValueError) as e:  # truncated, corrupt, unsupported mode
        raise ValueError(first_line(e)) from None


def _to_rgb8(im: object) -> np.ndarray:
    """Any Pillow mode → uint8 RGB: 16- and 32-bit samples scaled to 8 bits by their type's range."""
    from PIL import Image

    assert isinstance(im, Image.Image)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            a8 = np.clip(a, 0, 255).astype(np.uint8)
        elif im.mode == "I":
            a8 = np.clip(a, 0, 65535).astype(np.uint32) >> 8
        else:
            a8 = a.astype(np.uint32) >> 8
        return np.repeat(a8.astype(np.uint8)[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def resize(img: np.ndarray, size: int, antialias: bool = False) -> np.ndarray:
    """uint8 [size, size, 3]: bilinear as training resized its crops (see module docstring)."""
    if antialias:
        from crackscale.imaging.tfdecode import resize_uint8

        return resize_uint8(img, size, antialias=True)
    out = np.empty((size, size, 3), np.uint8)
    jpeg.resize_into(np.ascontiguousarray(img), size, out)
    return out


def decode(data: bytes, fmt: str, orientation: int, image_size: int, antialias: bool = False) -> np.ndarray:
    """The whole picture as the model's input (for formats TensorFlow does not decode)."""
    return resize(decode_rgb(data, fmt, orientation), image_size, antialias)
