"""TensorFlow's ``ResizeBilinear`` CPU kernel (half-pixel centres; float32 lerps, horizontal first, in
its order of operations) compiled by numba without fast-math, then clip and round half to even as
``tf.round``. Used by ``jpeg.decode``; imported only when a JPEG is decoded without TensorFlow.

The kernels are top-level functions on purpose: numba's disk cache keys a closure by its captured
variables, which differ in every process, so a nested kernel would be compiled again in every
process, each compile adding another cache file.
"""

from __future__ import annotations

import logging
from typing import Any

import numba
import numpy as np

log = logging.getLogger(__name__)


def _jit(fn: Any) -> Any:
    """Compiled with numba's disk cache (next to this module, else numba's user cache); where neither
    is writable (read-only install, no home directory) compiled in each process instead."""
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError as e:
        log.info("numba cannot cache the JPEG resize (%s): compiling it in this process", e)
        return numba.njit(nogil=True)(fn)


@_jit
def axis(n_in: int, n_out: int) -> Any:
    # TF's HalfPixelScaler + compute_interpolation_weights, in float32
    s = np.float32(n_in) / np.float32(n_out)
    lo = np.empty(n_out, np.int64)
    hi = np.empty(n_out, np.int64)
    lerp = np.empty(n_out, np.float32)
    for i in range(n_out):
        v = (np.float32(i) + np.float32(0.5)) * s - np.float32(0.5)
        f = np.float32(np.floor(v))
        lo[i] = max(np.int64(f), 0)
        hi[i] = min(np.int64(np.ceil(v)), n_in - 1)
        lerp[i] = v - f
    return lo, hi, lerp


@_jit
def resize(img: Any, size: int, out: Any) -> None:
    h, w, ch = img.shape
    src = img.reshape(h * w * ch)
    dst = out.reshape(size * size * ch)
    xlo, xhi, xl = axis(w, size)
    ylo, yhi, yl = axis(h, size)
    n = size * ch
    ia = np.empty(n, np.int64)
    ib = np.empty(n, np.int64)
    wl = np.empty(n, np.float32)
    for i in range(size):
        for c in range(ch):
            ia[i * ch + c] = xlo[i] * ch + c
            ib[i * ch + c] = xhi[i] * ch + c
            wl[i * ch + c] = xl[i]
    rows = np.empty((h, n), np.float32)  # horizontal lerp of each input row that is used
    used = np.zeros(h, np.bool_)
    for j in range(size):
        used[ylo[j]] = True
        used[yhi[j]] = True
    for y in range(h):
        if used[y]:
            base = y * w * ch
            for q in range(n):
                left = np.float32(src[base + ia[q]])
                rows[y, q] = left + (np.float32(src[base + ib[q]]) - left) * wl[q]
    for j in range(size):
        top = rows[ylo[j]]
        bottom = rows[yhi[j]]
        t = yl[j]
        o = j * n
        for q in range(n):
            r = top[q] + (bottom[q] - top[q]) * t
            r = min(max(r, np.float32(0)), np.float32(255))
            dst[o + q] = np.uint8(np.rint(r))
