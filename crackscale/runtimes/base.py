"""What every runtime shares: the ``Runtime`` protocol, default batch sizes and fixed-shape padding."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runtime(Protocol):
    name: str

    def predict(self, images: np.ndarray) -> np.ndarray: ...


# Images per model call when ``batch_size`` is 0. LiteRT/XNNPACK on CPU runs fastest on small
# batches (their activations stay in cache; docs/benchmarks.md); tf.keras (GPU) wants large ones.
DEFAULT_BATCH = {"litert": 4, "tf": 64}


def pad(images: np.ndarray, n: int) -> np.ndarray:
    """Pad a batch to ``n`` rows so compiled shapes never change (no retracing/reallocation)."""
    if len(images) == n:
        return images
    pad = np.zeros((n - len(images),) + images.shape[1:], dtype=images.dtype)
    return np.concatenate([images, pad])
