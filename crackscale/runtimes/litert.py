"""LiteRT (XNNPACK) as a scoring runtime: export from a tf.keras model, the interpreter, and the
parity check that a LiteRT export gives tf.keras's probabilities before it is trusted."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from crackscale.runtimes.base import Runtime, pad


class LiteRTRuntime:
    """An exported ``.tflite`` model on the LiteRT interpreter (XNNPACK delegate; fp32, or int8
    with ``name="litert-int8"``)."""

    def __init__(self, model: str | Path | bytes, batch_size: int, threads: int = 0, name: str = "litert") -> None:
        """``model``: a ``.tflite`` path, or its bytes."""
        from ai_edge_litert.interpreter import Interpreter

        self.name = name
        self.batch_size = batch_size
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        self._it = Interpreter(**source, num_threads=threads or os.cpu_count() or 1)
        inp = self._it.get_input_details()[0]
        self._in = inp["index"]
        self._it.resize_tensor_input(self._in, [batch_size, *inp["shape"][1:]])
        self._it.allocate_tensors()
        self._out = self._it.get_output_details()[0]["index"]

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            part = images[i : i + self.batch_size]
            self._it.set_tensor(self._in, pad(part.astype(np.float32, copy=False), self.batch_size))
            self._it.invoke()
            out.append(self._it.get_tensor(self._out).reshape(-1)[: len(part)].copy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _converter(model: Any) -> Any:
    """A TFLite converter for ``model`` in inference mode, any batch size."""
    return _function_converter(lambda x: model(x, training=False), model)


def _function_converter(fn: Any, model: Any) -> Any:
    """A TFLite converter for ``fn`` (a function of ``model``'s input batch), any batch size.

    Built from one concrete function whose only tracked state is the model's variables:
    ``TFLiteConverter.from_keras_model`` first writes a Keras SavedModel, tracing every layer's
    call, which takes several times longer and yields the same probabilities.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
    holder = tf.Module()
    holder.variables_ = list(model.variables)
    holder.serve = tf.function(fn, input_signature=[spec])
    return tf.lite.TFLiteConverter.from_concrete_functions([holder.serve.get_concrete_function()], holder)


def export_litert(model: Any, path: str | Path) -> Path:
    """Convert a tf.keras model to an fp32 ``.tflite`` file (atomic write, SHA-256 beside it)."""
    return _write(_converter(model).convert(), Path(path))


def export_litert_int8(model: Any, path: str | Path, representative: np.ndarray) -> Path:
    """Full-integer post-training quantisation: int8 weights and activations, calibrated on
    ``representative`` (uint8 NHWC images, one per calibration step). Input and output stay float32,
    so the runtime is fed exactly as the fp32 export and returns probabilities."""
    import tensorflow as tf

    if not len(representative):
        raise ValueError("int8 export needs representative images")
    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([img[None].astype(np.float32)] for img in representative)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return _write(conv.convert(), Path(path))


def export_heatmap(model: Any, cam: Any, path: str | Path) -> Path:
    """Convert ``cam``, ``model``'s class activation map (``crackscale.model.class_activation``),
    to an fp32 ``.tflite`` file: images in, (N, h, w) maps out."""
    return _write(_function_converter(cam, model).convert(), Path(path))


class LiteRTHeatmaps:
    """Grad-CAM heatmaps from an exported class activation map (``export_heatmap``), on the LiteRT
    interpreter: no TensorFlow in the process."""

    def __init__(self, model: str | Path | bytes, threads: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        self._it = Interpreter(**source, num_threads=threads or os.cpu_count() or 1)
        self._in = self._it.get_input_details()[0]["index"]
        self._out = self._it.get_output_details()[0]["index"]

    def maps(self, images: np.ndarray) -> np.ndarray:
        """Heatmaps in 0..1, (N, h, w) at the last conv block's resolution, for RGB 0..255 ``images``
        (N, H, W, 3) of the model's input size: the map ReLU'd and scaled to its maximum, as
        Grad-CAM's are. A map with no positive value stays all zero."""
        x = np.asarray(images, dtype=np.float32)
        self._it.resize_tensor_input(self._in, list(x.shape))
        self._it.allocate_tensors()
        self._it.set_tensor(self._in, x)
        self._it.invoke()
        cam = np.maximum(self._it.get_tensor(self._out), 0.0)
        return (cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-12)).astype(np.float32)


def _write(data: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # concurrent actors on one node may race: last complete file wins
    tmp.write_text(hashlib.sha256(data).hexdigest())
    os.replace(tmp, digest_path(path))  # written after the file: a file without it is not trusted
    return path


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of an exported ``.tflite`` is kept, beside it."""
    return path.with_name(path.name + ".sha256")


def verified(path: Path) -> bool:
    """Whether ``path`` is a whole export: its SHA-256 matches the digest written with it."""
    try:
        want = digest_path(path).read_text().strip()
        return hashlib.sha256(path.read_bytes()).hexdigest() == want
    except OSError:
        return False


def sample_images(image_size: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """Deterministic concrete-like images (half with cracks) for parity checks, uint8 NHWC."""
    from PIL import Image

    from crackscale.data import synth

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, _ = synth.make_image(rng, crack=bool(i % 2), size=max(image_size, 64))
        out.append(np.asarray(img.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8))
    return np.stack(out)


def parity(a: Runtime, b: Runtime, images: np.ndarray) -> float:
    """max |Δp| between two runtimes on ``images``."""
    return float(np.max(np.abs(a.predict(images) - b.predict(images)))) if len(images) else 0.0


def cache_path(cache_dir: str, model_sha256: str) -> Path:
    root = Path(cache_dir or os.path.join(tempfile.gettempdir(), "crackscale-cache"))
    return root / "litert" / f"{model_sha256}.tflite"
