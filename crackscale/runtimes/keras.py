"""tf.keras as a scoring runtime (graph mode, fixed batch shape), and TensorFlow's per-process set-up."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from crackscale.runtimes.base import pad

log = logging.getLogger(__name__)


def configure_tf(use_gpu: bool, threads: int = 0) -> int:
    """Call before the first TF op: GPU memory growth (TF grabs all memory otherwise), thread pools.

    Returns the number of visible GPUs. Safe to call on a CPU-only node (no GPUs: nothing to set).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as e:  # runtime already initialised in this process
            log.warning("could not enable memory growth on %s: %s", gpu.name, e)
    if use_gpu and not gpus:
        log.warning("use_gpu is set but TensorFlow sees no GPU on this node; running on CPU")
    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        except RuntimeError:
            pass
    return len(gpus)


class TFRuntime:
    """tf.keras in graph mode (``tf.function``), fixed batch shape."""

    def __init__(self, model: Any, batch_size: int, name: str = "tf") -> None:
        """``name``: what rows say scored them (``tf-fp16`` for a float16-compute model)."""
        import tensorflow as tf

        self.name = name
        self.batch_size = batch_size
        self._fn = tf.function(lambda x: model(x, training=False))

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            part = images[i : i + self.batch_size]
            x = pad(part.astype(np.float32, copy=False), self.batch_size)
            out.append(self._fn(x).numpy().reshape(-1)[: len(part)])
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
