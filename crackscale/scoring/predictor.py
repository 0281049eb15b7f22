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
from crackscale.runtimes.keras import TFRuntime, configure_tf
from crackscale.runtimes.litert import LiteRTRuntime
from crackscale.runtimes.select import select
from crackscale.scoring.decode import decode_batch, fast_jpeg
from crackscale.scoring.tiles import TileScorer

log = logging.getLogger(__name__)


def artifact_litert(cfg: ScoreConfig) -> tuple[Runtime, dict[str, Any]] | None:
    """The artifact's own LiteRT export, checksummed in ``model.json``: the int8 model when
    ``runtime: litert-int8``, or with ``auto`` when its recorded validation quality holds
    (``artifact.int8_qualifies``); else the fp32 model if its recorded parity with tf.keras is
    within ``cfg.parity_tolerance``; else None (no stored export, or a failed one: the caller
    converts and checks instead). The record carries the threshold its probabilities are judged at.

    Starts in well under a second: no TensorFlow import, no Keras load, no conversion.
    """
    meta = artifact.read_meta(cfg.model, cfg.storage)
    batch = cfg.batch_size or DEFAULT_BATCH["litert"]
    common = {"gpus": 0, "litert": "artifact", "model_sha256": meta.get("model_sha256")}
    if cfg.runtime in ("auto", "litert-int8"):
        good, why = artifact.int8_qualifies(meta)
        if cfg.runtime == "litert-int8" and not (meta.get("litert_int8") or {}).get("sha256"):
            raise artifact.ArtifactError(
                f"runtime litert-int8: {why} at {cfg.model}; add one with `crackscale export --int8 {cfg.model}`"
            )
        if good or cfg.runtime == "litert-int8":
            rec = meta["litert_int8"]
            rt = LiteRTRuntime(
                artifact.read_litert(cfg.model, meta, cfg.storage, int8=True), batch, cfg.threads, "litert-int8"
            )
            return rt, {**common, "runtime": "litert-int8", "threshold": rec["threshold"], "int8": why}
        log.info("int8 not used: %s", why)
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
    rt = LiteRTRuntime(artifact.read_litert(cfg.model, meta, cfg.storage), batch, cfg.threads)
    return rt, {
        **common,
        "runtime": "litert",
        "threshold": float(meta.get("threshold", 0.5)),
        "parity_max_abs_diff": diff,
        "parity_images": lit.get("parity_images"),
    }


def half_precision(
    cfg: ScoreConfig, loaded: artifact.Loaded, n_gpus: int, ready: tuple[Runtime, dict[str, Any]]
) -> tuple[Runtime, dict[str, Any]]:
    """tf.keras computing in float16 (``tf-fp16``) when ``mixed_precision`` says so: ``true``
    always, ``auto`` on GPUs when the artifact's float16 parity record holds; else ``ready``."""
    if cfg.mixed_precision == "false" or (cfg.mixed_precision == "auto" and n_gpus == 0):
        return ready
    good, why = artifact.fp16_qualifies(loaded.meta)
    if cfg.mixed_precision == "auto" and not good:
        log.info("float16 not used: %s", why)
        return ready
    half = artifact.mixed_model(loaded.model, loaded.meta)
    if half is None:
        if cfg.mixed_precision == "true":
            raise artifact.ArtifactError(
                f"mixed_precision: true, but {cfg.model} has no training config in model.json to rebuild "
                "the model in float16"
            )
        return ready
    rt = TFRuntime(half, ready[0].batch_size, "tf-fp16")
    return rt, dict(ready[1], runtime="tf-fp16", fp16=why)


class Predictor:
    """Ray Data actor: loads the artifact once (``loader`` is injectable for tests), then P(crack).

    ``decode`` (the keyword arguments of ``decode_batch``): batches hold URIs, and the actor reads
    and decodes them itself before predicting. Calls may then run two at a time (``actor_calls``; by
    default for objects on S3: one reading while the other predicts); the model runs one batch at a
    time.
    """

    def __init__(
        self,
        cfg: ScoreConfig,
        loader: Callable[..., Any] | None = None,
        decode: dict[str, Any] | None = None,
        model_id: str = "",
    ) -> None:
        """``model_id``: the run's model; an actor that finds another one at ``cfg.model`` (the
        artifact was replaced during the run) refuses to score."""
        import threading

        self.decode = decode
        self._model_lock = threading.Lock()
        self._photo_lock = threading.Lock()  # one full-size photo in memory at a time
        ready = None
        if loader is None and (cfg.runtime == "litert-int8" or (not cfg.use_gpu and cfg.runtime in ("auto", "litert"))):
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
            ready[1].update(
                model_sha256=loaded.meta.get("model_sha256"), threshold=float(loaded.meta.get("threshold", 0.5))
            )
            if ready[0].name == "tf":
                ready = half_precision(cfg, loaded, n_gpus, ready)
        self.runtime, self.info = ready
        self.threshold = float(self.info["threshold"])  # this runtime's decision threshold, in every row
        if model_id and not str(self.info.get("model_sha256") or "").startswith(model_id):
            raise artifact.ArtifactError(
                f"the model at {cfg.model} is no longer the one this run scores with (model_id {model_id}, "
                f"now {str(self.info.get('model_sha256'))[:16]}): it was replaced during the run; run again to "
                "score with the new model"
            )
        if decode:  # ready the decoder now, not in the first batch (TF's: after the model set its threads)
            size, aa = int(decode["image_size"]), bool(decode.get("antialias", RESIZE_ANTIALIAS))
            if not fast_jpeg(cfg, aa):  # else TensorFlow is imported only if a PNG/GIF/BMP (or damaged JPEG) comes
                decoders(size, aa)
        log.info("predictor ready: %s", self.info)

    def _predict(self, images: np.ndarray) -> np.ndarray:
        with self._model_lock:
            return self.runtime.predict(images)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """P(crack) per row: of the image, or of a tiled photo's highest tile (``tile_probs``: all of
        its tiles' probabilities in grid order, as float32 bytes; empty for images scored whole)."""
        import time

        scorer = TileScorer(self._predict, getattr(self.runtime, "batch_size", 1))
        if self.decode:
            batch = decode_batch(batch, **self.decode, on_tile=scorer.add, one_photo=self._photo_lock)
        for i, arr in enumerate(batch.get("tiles", ())):  # decoded in tasks: the tiles came with the rows
            for t in arr:
                scorer.add(i, t)
        scorer.flush()
        errors = np.asarray(batch["error"], dtype=object)
        n = len(errors)
        whole = np.array([not e for e in errors], dtype=bool) & (np.asarray(batch.get("n_tiles", np.zeros(n))) == 0)
        p = np.full(n, np.nan, np.float32)
        if whole.any():
            p[whole] = self._predict(np.asarray(batch["image"])[whole])
        tile_probs = np.full(n, b"", dtype=object)
        for i, probs in scorer.probabilities.items():
            arr = np.asarray(probs, np.float32)
            p[i], tile_probs[i] = arr.max(), arr.tobytes()
        out = {k: v for k, v in batch.items() if k not in ("image", "tiles")}
        out.update(
            crack_probability=p,
            error=errors,
            scored_at_us=np.full(n, int(time.time() * 1e6), np.int64),
            runtime=np.array([self.runtime.name] * n, dtype=object),
            threshold=np.full(n, self.threshold, np.float32),
            tile_probs=tile_probs,
        )
        return out
