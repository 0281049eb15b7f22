"""The TensorFlow decode: bytes → RGB at ``image_size`` with bilinear ``tf.image.resize``. Training
decodes every image this way; scoring uses the same ops (plus EXIF orientation) for what the
TensorFlow-free JPEG decoder does not take, so both see the same pixels."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from crackscale.config.train import TrainConfig

log = logging.getLogger(__name__)

# The default resize (TrainConfig.resize_antialias): bilinear without antialiasing, as the original
# script's image_dataset_from_directory did, at half the CPU of an antialiased resize. Recorded in
# model.json as "resize_antialias"; artifacts without the key were trained with True.
RESIZE_ANTIALIAS: bool = TrainConfig.resize_antialias

_DECODERS: dict[tuple[int, bool], Any] = {}


def resize_antialias(meta: dict[str, Any]) -> bool:
    """How the artifact's training resized images (artifacts without the key: antialiased)."""
    return bool(meta.get("resize_antialias", True))


def decode(data: Any, image_size: int, antialias: bool = RESIZE_ANTIALIAS) -> Any:
    """JPEG/PNG/BMP/GIF bytes → float32 [size, size, 3] RGB in 0..255 (model does the scaling)."""
    import tensorflow as tf

    img = tf.io.decode_image(data, channels=3, expand_animations=False)
    img = tf.image.resize(img, (image_size, image_size), antialias=antialias)
    img.set_shape((image_size, image_size, 3))
    return img


def decode_uint8(data: Any, image_size: int, antialias: bool) -> Any:
    """:func:`decode` rounded to uint8: the pixels training feeds the model."""
    import tensorflow as tf

    return tf.cast(tf.round(decode(data, image_size, antialias)), tf.uint8)


TF_IMPORT_CUT_SHORT_EXIT = 75  # exit status of a worker process whose TensorFlow import was cut short


def tf_import_cut_short() -> bool:
    """True in a process where ``import tensorflow`` was interrupted half-way.

    Python drops the failed ``tensorflow`` package but keeps the submodules already loaded, with
    their registries: every later ``import tensorflow`` in the process then fails ("Name
    tf.RaggedTensorSpec has already been registered"). Ray cancels a failed attempt's read/decode
    tasks (KeyboardInterrupt in the worker) and reuses the worker process for later tasks.
    """
    return "tensorflow" not in sys.modules and any(m.startswith("tensorflow.") for m in sys.modules)


def import_tf_or_exit() -> Any:
    """``import tensorflow`` for a Ray task. In a process where an earlier import was cut short and
    importing again fails, the process ends itself (status ``TF_IMPORT_CUT_SHORT_EXIT``): only a
    new process can import TensorFlow, and Ray Data retries a task whose worker died elsewhere."""
    cut_short = tf_import_cut_short()
    try:
        import tensorflow as tf
    except Exception as e:
        if not cut_short:
            raise
        log.error(
            "TensorFlow import was cut short earlier in this process (a cancelled task) and "
            "fails now (%s: %s); exiting so that the task is retried in a new worker process",
            type(e).__name__,
            str(e)[:200],
        )
        logging.shutdown()
        os._exit(TF_IMPORT_CUT_SHORT_EXIT)
    return tf


def decoders(image_size: int, antialias: bool) -> tuple[Any, Any]:
    """Compiled decoders (one pair per process): bytes + EXIF orientation → uint8 [size, size, 3],
    for one image and for a batch (the same ops in a ``tf.map_fn``: one call per batch saves the
    Python dispatch a per-image call costs, and gives bit-identical pixels)."""
    if (image_size, antialias) in _DECODERS:
        return _DECODERS[image_size, antialias]
    tf = import_tf_or_exit()

    if not _DECODERS:
        try:  # per-image ops: one thread each; parallelism comes from Ray tasks
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass

    def orient(img: Any, orientation: Any) -> Any:
        """EXIF orientation 1..8 → upright, as PIL.ImageOps.exif_transpose."""

        def tr(a: Any) -> Any:
            return tf.transpose(a, [1, 0, 2])

        branches = {
            1: lambda: img,
            2: lambda: img[:, ::-1],
            3: lambda: img[::-1, ::-1],
            4: lambda: img[::-1],
            5: lambda: tr(img),
            6: lambda: tf.image.rot90(img, 3),
            7: lambda: tr(img)[::-1, ::-1],
            8: lambda: tf.image.rot90(img, 1),
        }
        return tf.switch_case(orientation - 1, [branches[k] for k in range(1, 9)])

    def decode(data: Any, orientation: Any) -> Any:
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        img = tf.image.resize(orient(img, orientation), (image_size, image_size), antialias=antialias)
        return tf.cast(tf.round(tf.clip_by_value(img, 0, 255)), tf.uint8)

    one = tf.function(
        decode, autograph=False, input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32)]
    )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)], autograph=False)
    def many(data: Any, orientation: Any) -> Any:
        return tf.map_fn(
            lambda x: decode(x[0], x[1]),
            (data, orientation),
            fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.uint8),
        )

    _DECODERS[image_size, antialias] = (one, many)
    return one, many


def clean_error(e: Exception) -> str:
    """TF's error text without its graph locations (``{{function_node …}}``, ``[[…]]``, ``[Op:…]``)."""
    msg = str(getattr(e, "message", "") or e)
    msg = re.sub(r"\{\{[^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]", " ", msg, flags=re.S)
    skip = ("Graph execution error", "Detected at node", "File ")  # where the op was defined
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return lines[0] if lines else type(e).__name__


def resize_uint8(img: Any, size: int, antialias: bool) -> Any:
    """uint8 [h, w, 3] → uint8 [size, size, 3] with ``tf.image.resize`` (bilinear), rounded as
    training rounds its decoded crops."""
    tf = import_tf_or_exit()
    out = tf.image.resize(tf.constant(img), (size, size), antialias=antialias)
    return tf.cast(tf.round(tf.clip_by_value(out, 0, 255)), tf.uint8).numpy()
