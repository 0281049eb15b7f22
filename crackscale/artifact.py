"""Self-describing model artifacts: a directory with ``model.keras`` and ``model.json``.

``model.json`` holds everything a scorer needs (classes, crack class, input size, preprocessing,
threshold) and everything an auditor needs (metrics, resolved config, split manifest hash,
versions, history), plus the SHA-256 of ``model.keras``: a tampered model is refused. Loading uses
Keras safe mode (no Lambda layers / arbitrary code from the file). ``model.tflite`` is the same
model exported for LiteRT at save time; ``litert`` in model.json holds its SHA-256 and its measured
parity with tf.keras, so CPU scorers start from it directly. ``model_int8.tflite`` is an optional
full-integer export; ``litert_int8`` records its quality on the validation split next to tf.keras's
on the same images, and its own decision threshold (``int8_qualifies`` says whether it may be chosen).
``heatmap.tflite`` is the model's class activation map (Grad-CAM for this head) exported for
LiteRT; ``heatmap`` records its SHA-256 and its parity with the same map in TensorFlow, so a scoring
report draws heatmaps without TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crackscale import __version__, storage
from crackscale import model as M
from crackscale.config.storage import StorageConfig
from crackscale.errors import first_line
from crackscale.model import keras
from crackscale.runtimes.keras import TFRuntime
from crackscale.runtimes.litert import (
    LiteRTHeatmaps,
    LiteRTRuntime,
    export_heatmap,
    export_litert,
    export_litert_int8,
    parity,
    sample_images,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
LITERT_FILE = "model.tflite"
INT8_FILE = "model_int8.tflite"
HEATMAP_FILE = "heatmap.tflite"
# int8 is chosen automatically only if on validation it misses no more cracks than tf.keras and its
# accuracy is at most this much lower
INT8_ACCURACY_MARGIN = 0.002
META_FILE = "model.json"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """A model artifact is missing, incomplete or tampered with."""


def versions() -> dict[str, str]:
    import ray
    import tensorflow as tf

    return {
        "crackscale": __version__,
        "tensorflow": tf.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _export_litert(model: Any, local: Path, check_images: Any = None) -> dict[str, Any]:
    """Write ``model.tflite`` beside the model and measure max |Δp| against tf.keras on
    ``check_images`` (uint8 NHWC; training passes real validation images) or synthetic ones.
    A failed export is recorded, not raised: scorers then convert (and check) on their own."""
    path = local / LITERT_FILE
    try:
        export_litert(model, path)
        on = "validation images"
        if check_images is None or not len(check_images):
            check_images, on = sample_images(int(model.inputs[0].shape[1]), 32), "synthetic images"
        diff = parity(TFRuntime(model, 16), LiteRTRuntime(path, 16), check_images)
    except Exception as e:  # e.g. an op LiteRT lacks
        path.unlink(missing_ok=True)
        msg = first_line(e)
        log.warning("no LiteRT export stored in the artifact: %s", msg)
        return {"error": msg[:500]}
    log.info("LiteRT export stored: max |Δp| vs tf.keras = %.2e on %d %s", diff, len(check_images), on)
    return {
        "file": LITERT_FILE,
        "sha256": sha256_file(path),
        "parity_max_abs_diff": diff,
        "parity_images": len(check_images),
        "parity_on": on,
    }


def _export_heatmap(model: Any, local: Path, check_images: Any = None) -> dict[str, Any]:
    """Write ``heatmap.tflite`` beside the model and measure its maps (ReLU'd, scaled to 0..1)
    against the same map computed by TensorFlow. Recorded, not raised, when it fails: reports
    then compute Grad-CAM with TensorFlow."""
    path = local / HEATMAP_FILE
    try:
        cam = M.class_activation(model)
        export_heatmap(model, cam, path)
        if check_images is None or not len(check_images):
            check_images = sample_images(int(model.inputs[0].shape[1]), 8)
        check_images = np.asarray(check_images[:16], np.float32)
        want = np.maximum(cam(check_images).numpy(), 0.0)
        want /= want.max(axis=(1, 2), keepdims=True) + 1e-12
        diff = float(np.max(np.abs(LiteRTHeatmaps(path).maps(check_images) - want)))
    except Exception as e:  # a head other than GAP → Dropout → Dense, an op LiteRT lacks
        path.unlink(missing_ok=True)
        msg = first_line(e)
        log.warning("no heatmap export stored in the artifact: %s", msg)
        return {"error": msg[:500]}
    log.info("heatmap export stored: max |Δ| vs TensorFlow = %.2e on %d images", diff, len(check_images))
    return {
        "file": HEATMAP_FILE,
        "sha256": sha256_file(path),
        "layer": M.LAST_CONV,
        "parity_max_abs_diff": diff,
        "parity_images": len(check_images),
    }


def add_heatmap(uri: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Add (or replace) the heatmap export of the artifact at ``uri``; returns its record. The
    model and its SHA-256 (the artifact's ``model_id``) stay as they are."""
    return _add_export(uri, "heatmap", HEATMAP_FILE, lambda model, tmp, meta: _export_heatmap(model, tmp), cfg)


def _add_export(
    uri: str,
    key: str,
    filename: str,
    export: Callable[[Any, Path, dict[str, Any]], dict[str, Any]],
    cfg: StorageConfig | None,
) -> dict[str, Any]:
    """Write ``export(model, tmp_dir, meta)``'s file into the artifact at ``uri`` and its record under
    model.json's ``key``; model.json is rewritten last, so a failed upload leaves it as it was."""
    loaded = load(uri, cfg)
    with tempfile.TemporaryDirectory(prefix=f"crackscale-{key}-") as tmp:
        record = export(loaded.model, Path(tmp), loaded.meta)
        if record.get("sha256"):
            storage.write_bytes(storage.join(uri, filename), (Path(tmp) / filename).read_bytes(), cfg)
    meta = dict(loaded.meta, **{key: record})
    storage.write_text(storage.join(uri, META_FILE), json.dumps(meta, indent=2, sort_keys=False, default=str), cfg)
    return record


@dataclass
class Int8Data:
    """What an int8 export is calibrated and judged on: ``representative`` training images (both
    classes) and the validation split (uint8 NHWC images, 0/1 labels)."""

    representative: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    val_sources: list[str] | None = None  # each validation image's source: the threshold holds on each


def _export_int8(model: Any, local: Path, meta: dict[str, Any], data: Int8Data) -> dict[str, Any]:
    """Write ``model_int8.tflite`` and measure it on the validation split beside tf.keras: its own
    threshold for the artifact's ``target_recall``, accuracy and recall at it, tf.keras's at the
    artifact's threshold on the same images, decision agreement and max |Δp|. A failed export is
    recorded, not raised (scorers then use fp32)."""
    import time

    path = local / INT8_FILE
    t0 = time.perf_counter()
    try:
        export_litert_int8(model, path, data.representative)
        convert_s = time.perf_counter() - t0
        y = np.asarray(data.val_labels).astype(int)
        p8 = LiteRTRuntime(path, 16).predict(data.val_images)
        p32 = TFRuntime(model, 64).predict(data.val_images)
    except Exception as e:  # e.g. an op without an int8 kernel
        path.unlink(missing_ok=True)
        msg = first_line(e)
        log.warning("no int8 export stored in the artifact: %s", msg)
        return {"error": msg[:500]}
    thr32 = float(meta.get("threshold", 0.5))
    names = data.val_sources if data.val_sources is not None else [""] * len(y)
    targets = meta.get("target_recall_by_source") or {}
    thr8, _ = M.threshold_for_sources(y, p8, names, targets, float(meta.get("target_recall", 0.99)))
    m8, m32 = M.metrics(y, p8, thr8), M.metrics(y, p32, thr32)
    record = {
        "file": INT8_FILE,
        "sha256": sha256_file(path),
        "threshold": thr8,
        "representative_images": len(data.representative),
        "convert_s": round(convert_s, 1),
        "val": {k: m8[k] for k in ("n", "accuracy", "recall", "precision", "roc_auc")},
        "fp32_val": {k: m32[k] for k in ("n", "accuracy", "recall", "precision", "roc_auc")},
        "agreement": float(((p8 >= thr8) == (p32 >= thr32)).mean()) if len(y) else 0.0,
        "max_abs_diff": float(np.max(np.abs(p8 - p32))) if len(y) else 0.0,
    }
    ok, why = int8_qualifies({"litert_int8": record})
    log.info("int8 export stored (%s): %s", "chosen by runtime auto" if ok else "not chosen by auto", why)
    return record


FP16_TOLERANCE = 0.01  # largest recorded |Δp| of float16 compute for runtime auto to use it on GPUs


def mixed_model(model: Any, meta: dict[str, Any]) -> Any:
    """``model`` rebuilt to compute in float16 (float32 weights and output), its weights copied;
    None when ``meta`` lacks the training config that describes the architecture."""
    from crackscale.config.loader import ConfigError, from_dict
    from crackscale.config.train import TrainConfig

    if not meta.get("config"):
        return None
    try:
        cfg = from_dict(TrainConfig, meta["config"])
    except (ConfigError, TypeError, ValueError):
        return None
    mixed, _ = M.build(cfg, load_weights=False, mixed=True)
    mixed.set_weights(model.get_weights())
    return mixed


def _fp16_record(model: Any, meta: dict[str, Any], images: Any) -> dict[str, Any]:
    """How float16 compute changes the probabilities on ``images``: max |Δp| and decision agreement
    at the artifact's threshold (what ``runtime auto`` checks before scoring in float16 on GPUs)."""
    try:
        half = mixed_model(model, meta)
        if half is None:
            return {"error": "no training config in model.json to rebuild the model in float16"}
        p16, p32 = TFRuntime(half, 16).predict(images), TFRuntime(model, 16).predict(images)
    except Exception as e:  # an op without a float16 kernel on this device
        msg = first_line(e)
        return {"error": msg[:500]}
    thr = float(meta.get("threshold", 0.5))
    return {
        "max_abs_diff": float(np.max(np.abs(p16 - p32))) if len(images) else 0.0,
        "agreement": float(((p16 >= thr) == (p32 >= thr)).mean()) if len(images) else 0.0,
        "images": len(images),
    }


def fp16_qualifies(meta: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``runtime auto`` may score in float16 on GPUs, and why (one line)."""
    rec = (meta.get("mixed_precision") or {}).get("scoring_fp16") or {}
    if "max_abs_diff" not in rec:
        return False, "no float16 parity record" + (f" ({rec['error']})" if rec.get("error") else "")
    said = f"float16 max |Δp| {rec['max_abs_diff']:.2e}, same decision on {rec['agreement']:.4f} of {rec['images']}"
    if rec["max_abs_diff"] > FP16_TOLERANCE or rec["agreement"] < 1.0:
        return False, said + f": beyond |Δp| {FP16_TOLERANCE} or a changed decision"
    return True, said


def int8_qualifies(meta: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``runtime: auto`` may score with the int8 export, and why (one line)."""
    rec = meta.get("litert_int8") or {}
    if not rec.get("sha256"):
        return False, "the artifact has no int8 export" + (f" ({rec['error']})" if rec.get("error") else "")
    v, f = rec["val"], rec["fp32_val"]
    said = (
        f"validation recall {v['recall']:.4f} vs fp32 {f['recall']:.4f}, "
        f"accuracy {v['accuracy']:.4f} vs {f['accuracy']:.4f} on {v['n']} images"
    )
    if not v["n"]:
        return False, "no validation images measured the int8 export"
    if v["recall"] < f["recall"]:
        return False, said + ": it misses more cracks"
    if v["accuracy"] < f["accuracy"] - INT8_ACCURACY_MARGIN:
        return False, said + f": accuracy more than {INT8_ACCURACY_MARGIN * 100:g} points lower"
    return True, said


def add_int8(uri: str, data: Int8Data, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Add (or replace) the int8 export of the artifact at ``uri``; returns its record. The model
    and its SHA-256 (the artifact's ``model_id``) stay as they are."""
    return _add_export(
        uri, "litert_int8", INT8_FILE, lambda model, tmp, meta: _export_int8(model, tmp, meta, data), cfg
    )


def save(
    model: Any,
    meta: dict[str, Any],
    uri: str,
    extra_dir: str | Path | None = None,
    cfg: StorageConfig | None = None,
    check_images: Any = None,
    int8: Int8Data | None = None,
) -> str:
    """Write model + its LiteRT export(s) + model.json (+ files of ``extra_dir``) to ``uri``;
    model.json is written last. ``check_images``: uint8 NHWC images for the LiteRT parity check;
    ``int8``: calibration and validation images for a full-integer export too."""
    with tempfile.TemporaryDirectory(prefix="crackscale-art-") as tmp:
        local = Path(tmp) / "artifact"
        if extra_dir and Path(extra_dir).is_dir():
            import shutil

            shutil.copytree(extra_dir, local)
        local.mkdir(exist_ok=True)
        model.save(local / MODEL_FILE)
        meta = dict(
            meta,
            format_version=FORMAT_VERSION,
            model_file=MODEL_FILE,
            model_sha256=sha256_file(local / MODEL_FILE),
            litert=_export_litert(model, local, check_images),
        )
        meta["heatmap"] = _export_heatmap(model, local, check_images)
        if int8 is not None:
            meta["litert_int8"] = _export_int8(model, local, meta, int8)
        if check_images is not None and len(check_images) and meta.get("config"):
            fp16 = _fp16_record(model, meta, check_images)
            meta["mixed_precision"] = dict(meta.get("mixed_precision") or {}, scoring_fp16=fp16)
        meta_text = json.dumps(meta, indent=2, sort_keys=False, default=str)
        storage.upload_dir(local, uri, cfg)
        # model.json last: an artifact without it is incomplete and refused by load()
        storage.write_text(storage.join(uri, META_FILE), meta_text, cfg)
    log.info("model artifact written to %s", uri)
    return uri


def read_meta(uri: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri, cfg):
        raise ArtifactError(f"not a crackscale model artifact (no {META_FILE}): {uri}")
    try:
        return json.loads(storage.read_text(meta_uri, cfg))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_uri} is not valid JSON: {e}") from None


_EXPORTS = {"litert": LITERT_FILE, "litert_int8": INT8_FILE, "heatmap": HEATMAP_FILE}
_EXPORT_NAMES = {"litert": "LiteRT", "litert_int8": "int8 LiteRT", "heatmap": "heatmap"}


def read_litert(
    uri: str, meta: dict[str, Any], cfg: StorageConfig | None = None, int8: bool = False, key: str = ""
) -> bytes:
    """The artifact's LiteRT export named by ``key`` in model.json (default ``litert``, or
    ``litert_int8`` with ``int8``; ``heatmap``), checked against its SHA-256."""
    key = key or ("litert_int8" if int8 else "litert")
    name, what = _EXPORTS[key], _EXPORT_NAMES[key]
    lit = meta.get(key) or {}
    if lit.get("file") != name or not lit.get("sha256"):
        raise ArtifactError(f"artifact {uri} holds no {what} export")
    try:
        data = storage.read_bytes(storage.join(uri, name), cfg)
    except (FileNotFoundError, storage.StorageError) as e:
        raise ArtifactError(f"{what} file missing from artifact {uri}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != lit["sha256"]:
        raise ArtifactError(
            f"{name} of {uri} does not match the checksum in {META_FILE} "
            f"({digest[:12]}… != {str(lit['sha256'])[:12]}…): refusing a tampered artifact"
        )
    return data


@dataclass
class Loaded:
    model: Any
    meta: dict[str, Any]
    local_dir: Path


def load(uri: str, cfg: StorageConfig | None = None, compile: bool = False) -> Loaded:
    """Download (if remote), verify the checksum, and load the model in Keras safe mode."""
    meta = read_meta(uri, cfg)
    name = str(meta.get("model_file", MODEL_FILE))
    if Path(name).name != name or not name.endswith(".keras"):
        # only the native .keras format is checked by safe mode: legacy .h5/SavedModel loading runs
        # a Lambda layer's bytecode even with safe_mode=True (checked with tf-keras 2.21)
        raise ArtifactError(
            f"artifact {uri}: model_file {name!r} refused (only a '.keras' file inside "
            "the artifact directory is loaded)"
        )
    local = storage.download_dir(uri, cfg=cfg)
    path = local / name
    if not path.is_file():
        raise ArtifactError(f"model file missing from artifact {uri}: {path.name}")
    digest = sha256_file(path)
    if digest != meta.get("model_sha256"):
        raise ArtifactError(
            f"model file of {uri} does not match the checksum in {META_FILE} "
            f"({digest[:12]}… != {str(meta.get('model_sha256'))[:12]}…): refusing a tampered artifact"
        )
    try:
        model = keras().models.load_model(path, compile=compile, safe_mode=True)
    except (ValueError, TypeError) as e:  # Lambda layers, unknown custom objects, bad configs
        msg = first_line(e)
        raise ArtifactError(f"model file of {uri} refused by Keras safe mode: {msg}") from None
    return Loaded(model=model, meta=meta, local_dir=local)
