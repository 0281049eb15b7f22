"""JPEG decode + resize without TensorFlow, bit-identical to training's (``imaging.tfdecode.decode`` with
``resize_antialias: false``: ``tf.io.decode_image`` + bilinear ``tf.image.resize``, rounded to uint8).

Why: a scoring actor that decodes with TensorFlow imports it (seconds of CPU and hundreds of MiB
per process) only for that. With the artifact's LiteRT export, the model needs no TensorFlow either,
so a CPU actor that decodes this way never imports it.

- Decode: libjpeg-turbo through ``simplejpeg`` with the settings TensorFlow's decoder uses: the
  integer fast DCT and fancy (smooth) chroma upsampling. ``strict``: any libjpeg warning (a truncated
  or damaged file) raises, and the caller lets TensorFlow decide on that file.
- Resize: TensorFlow's ``ResizeBilinear`` CPU kernel, compiled by numba (``imaging.resize``).
- ``available()`` proves it on this node before the first use: the package's ``decode_check.jpg``
  must decode and resize to the SHA-256 digests TensorFlow gives (``CHECK_DIGESTS``; a test checks
  them against TensorFlow). A different libjpeg-turbo or numba build that differs turns this path
  off with a warning, and TensorFlow decodes everything.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CHECK_FILE = Path(__file__).with_name("decode_check.jpg")  # synthetic crack, 227 × 227, 4:2:0, quality 90
# SHA-256 of TensorFlow's uint8 pixels for CHECK_FILE: decoded, and resized to each size (no antialias)
CHECK_DIGESTS = {
    0: "b044fcf070c817b7391d86006466837ca5248ac95f954161382cfde9a4036bb9",
    160: "f31deb94e25c7d0806e2e8af839ecfda955f50e420c2253426ed1d0f12360cfe",
    96: "9e2a6f0f3775a12bb4f0d09b5c6c31b0e73f6544ee29c1b60a6398243ce986a1",
    300: "de539d362d24b439efccc3faea2c8dffe06395abe1e2712f1ef26bb6dea02b3e",  # enlarged
}

_state: dict[str, Any] = {}


def _kernels() -> Any:
    """The compiled resize (``imaging.resize``: numba, loaded from its disk cache or compiled)."""
    if "resize" not in _state:
        from crackscale.imaging import resize  # numba: imported only when a JPEG is decoded this way

        _state["resize"] = resize.resize
    return _state["resize"]


def orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 1..8 → upright, as ``imaging.tfdecode``'s decoder (PIL.ImageOps.exif_transpose)."""
    if orientation == 2:
        return img[:, ::-1]
    if orientation == 3:
        return img[::-1, ::-1]
    if orientation == 4:
        return img[::-1]
    if orientation == 5:
        return img.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(img, 3)
    if orientation == 7:
        return img.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(img, 1)
    return img


def _decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 as decoded, with TensorFlow's settings; raises on any libjpeg error or warning."""
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False, strict=True)


def decode_full(data: bytes) -> np.ndarray:
    """The whole JPEG as decoded (uint8 RGB, orientation not applied); raises on any libjpeg error
    or warning."""
    return _decode_jpeg(data)


def resize_into(img: np.ndarray, size: int, out: np.ndarray) -> None:
    """TensorFlow's bilinear resize (no antialias) of a contiguous uint8 [h, w, 3] into ``out``."""
    _kernels()(img, size, out)


def decode(data: bytes, image_size: int, orientation: int = 1) -> np.ndarray | None:
    """uint8 [image_size, image_size, 3] upright, or None where libjpeg reports any error or
    warning (the caller decodes that file with TensorFlow, which then gives its answer)."""
    try:
        img = _decode_jpeg(data)
    except Exception:  # noqa: BLE001 (ValueError from libjpeg, or anything else: TensorFlow decides)
        return None
    img = np.ascontiguousarray(orient(img, orientation))
    out = np.empty((image_size, image_size, 3), np.uint8)
    _kernels()(img, image_size, out)
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).hexdigest()


def check_digests() -> dict[int, str]:
    """This node's digests of ``CHECK_FILE`` (0: decoded, else resized to that size)."""
    data = CHECK_FILE.read_bytes()
    out = {0: _digest(_decode_jpeg(data))}
    for size in CHECK_DIGESTS:
        if size:
            out[size] = _digest(decode(data, size))
    return out


def mismatches() -> list[int]:
    """The ``CHECK_DIGESTS`` sizes this node gets other pixels at (0: as decoded); [] = same as
    TensorFlow. Raises where simplejpeg or numba cannot be imported or run."""
    got = check_digests()
    return sorted(k for k, v in CHECK_DIGESTS.items() if got.get(k) != v)


def available() -> bool:
    """True if this process can decode JPEGs this way: simplejpeg and numba import, and the check
    image gives TensorFlow's pixels (checked once per process; compiles or loads the resize)."""
    if "ok" not in _state:
        try:
            bad = mismatches()
            if bad:
                log.warning(
                    "JPEG decoding without TensorFlow gives other pixels than TensorFlow on this node "
                    "(%s): decoding with TensorFlow",
                    ", ".join(f"size {k or 'as decoded'}" for k in bad),
                )
            _state["ok"] = not bad
        except Exception as e:  # noqa: BLE001 (missing/broken library: TensorFlow still decodes correctly)
            log.warning(
                "JPEG decoding without TensorFlow is unavailable (%s: %s): decoding with TensorFlow",
                type(e).__name__,
                e,
            )
            _state["ok"] = False
    return bool(_state["ok"])
