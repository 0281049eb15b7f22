"""Choosing the runtime a scoring actor uses: tf.keras on GPUs, LiteRT on CPU when its export
matches tf.keras within a tolerance, tf.keras otherwise."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from crackscale.runtimes.base import DEFAULT_BATCH, Runtime
from crackscale.runtimes.keras import TFRuntime
from crackscale.runtimes.litert import LiteRTRuntime, cache_path, export_litert, parity, sample_images, verified

log = logging.getLogger(__name__)


def select(
    model: Any,
    meta: dict[str, Any],
    kind: str,
    batch_size: int,
    threads: int = 0,
    n_gpus: int = 0,
    cache_dir: str = "",
    tolerance: float = 1e-4,
    check_images: np.ndarray | None = None,
) -> tuple[Runtime, dict[str, Any]]:
    """The runtime to score with and a record of the choice (runtime, parity max |Δp|).

    ``auto``: tf.keras when a GPU is visible (``n_gpus``), else LiteRT if it passes the parity
    check, else tf. ``litert`` forces LiteRT but still refuses it (ValueError) when parity fails.
    """
    tf_rt = TFRuntime(model, batch_size or DEFAULT_BATCH["tf"])
    if kind == "tf" or (kind == "auto" and n_gpus > 0):
        return tf_rt, {"runtime": "tf", "gpus": n_gpus, "parity_max_abs_diff": None}
    sha = str(meta.get("model_sha256") or "")
    path = cache_path(cache_dir, sha) if sha else Path(tempfile.mkdtemp()) / "model.tflite"
    try:
        if not verified(path):
            if path.is_file():
                log.warning("LiteRT cache %s does not match its recorded SHA-256: exporting it again", path)
            log.info("exporting the model to LiteRT: %s", path)
            export_litert(model, path)
        lite = LiteRTRuntime(path, batch_size or DEFAULT_BATCH["litert"], threads)
    except Exception as e:  # converter/interpreter failure: tf.keras still scores correctly
        if kind == "litert":
            raise
        log.warning("LiteRT export/load failed (%s); scoring with tf.keras", e)
        return tf_rt, {"runtime": "tf", "gpus": n_gpus, "parity_max_abs_diff": None}
    images = check_images if check_images is not None else sample_images(int(meta["image_size"]))
    diff = parity(tf_rt, lite, images)
    info = {"runtime": "litert", "gpus": n_gpus, "parity_max_abs_diff": diff, "litert": "converted"}
    if diff > tolerance:
        msg = f"LiteRT export differs from tf.keras by max |Δp| = {diff:.2e} > {tolerance:.0e}"
        if kind == "litert":
            raise ValueError(msg + " (runtime: litert was requested)")
        log.warning("%s; scoring with tf.keras", msg)
        return tf_rt, dict(info, runtime="tf")
    log.info("LiteRT parity with tf.keras: max |Δp| = %.2e on %d images", diff, len(images))
    return lite, info
