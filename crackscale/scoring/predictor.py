"""The model actor: loads the artifact once, then P(crack) for each batch (reading and decoding it
first with ``decode: actor``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from crackscale import artifact
from crackscale.config.score import ScoreConfig
from crackscale.imaging.tfdecode import RESIZE_ANTIALIAS, decoders
from crackscale.runtimes.base import DEFAULT_BATCH, Runtime
from crackscale.runtimes.keras import configure_tf
from crackscale.runtimes.litert import LiteRTRuntime
from crackscale.runtimes.select import select
from crackscale.scoring.decode import decode_batch, fast_jpeg

log = logging.getLogger(__name__)


def artifact_litert(cfg: ScoreConfig) -> tuple[Runtime, dict[str, Any]] | None:
    """The artifact's own LiteRT export (``model.tflite``, checksummed in ``model.json``) if its
    recorded parity with tf.keras is within ``cfg.parity_tolerance``; else None (artifacts from
    before exports were stored, or a failed export: the caller converts and checks instead).

    Starts in well under a second: no TensorFlow import, no Keras load, no conversion.
    """
    meta = artifact.read_meta(cfg.model, cfg.storage)
    lit = meta.get("litert") or {}
    diff = lit.get("parity_max_abs_diff")
    if not lit.get("sha256") or diff is None:
        return None
    if diff > cfg.parity_tolerance:
        log.warning(
            "the artifact's LiteRT export differs from tf.keras by max |Δp| = %.2e > %.0e; converting again",
            diff,
            cfg.parity_tolerance,
        )
        return None
    rt = LiteRTRuntime(
        artifact.read_litert(cfg.model, meta, cfg.storage), cfg.batch_size or DEFAULT_BATCH["litert"], cfg.threads
    )
    return rt, {
        "runtime": "litert",
        "gpus": 0,
        "parity_max_abs_diff": diff,
        "litert": "artifact",
        "parity_images": lit.get("parity_images"),
    }


class Predictor:
    """Ray Data actor: loads the artifact once (``loader`` is injectable for tests), then P(crack).

    ``decode`` (the keyword arguments of ``decode_batch``): batches hold URIs, and the actor reads
    and decodes them itself before predicting. Calls may then run two at a time (``actor_calls``; by
    default for objects on S3: one reading while the other predicts); the model runs one batch at a
    time.
    """

    def __init__(
        self, cfg: ScoreConfig, loader: Callable[..., Any] | None = None, decode: dict[str, Any] | None = None
    ) -> None:
        import threading

        self.decode = decode
        self._model_lock = threading.Lock()
        ready = None
        if loader is None and not cfg.use_gpu and cfg.runtime in ("auto", "litert"):
            ready = artifact_litert(cfg)  # the artifact's checked export: no Keras model in this actor
        if ready is None:
            n_gpus = configure_tf(cfg.use_gpu, cfg.threads)  # before the model's first TF op
            loaded = (loader or artifact.load)(cfg.model, cfg.storage)
            ready = select(
                loaded.model,
                loaded.meta,
                cfg.runtime,
                cfg.batch_size,
                cfg.threads,
                n_gpus,
                cfg.cache_dir,
                cfg.parity_tolerance,
            )
        self.runtime, self.info = ready
        if decode:  # ready the decoder now, not in the first batch (TF's: after the model set its threads)
            size, aa = int(decode["image_size"]), bool(decode.get("antialias", RESIZE_ANTIALIAS))
            if not fast_jpeg(cfg, aa):  # else TensorFlow is imported only if a PNG/GIF/BMP (or damaged JPEG) comes
                decoders(size, aa)
        log.info("predictor ready: %s", self.info)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        if self.decode:
            batch = decode_batch(batch, **self.decode)
        errors = np.asarray(batch["error"], dtype=object)
        ok = np.array([not e for e in errors], dtype=bool)
        p = np.full(len(errors), np.nan, np.float32)
        if ok.any():
            with self._model_lock:
                p[ok] = self.runtime.predict(np.asarray(batch["image"])[ok])
        out = {k: v for k, v in batch.items() if k != "image"}
        n = len(errors)
        out.update(
            crack_probability=p,
            error=errors,
            scored_at_us=np.full(n, int(time.time() * 1e6), np.int64),
            runtime=np.array([self.runtime.name] * n, dtype=object),
        )
        return out
