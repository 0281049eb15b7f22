"""MobileNetV2 crack classifier (tf.keras, i.e. tf-keras under Ray Train) and its metrics.

The model takes raw RGB pixels (0..255, float) of ``image_size``; augmentation (active only in
training) and MobileNetV2's ``preprocess_input`` scaling (x / 127.5 - 1, as a Rescaling layer,
so no Lambda/custom code is needed to load it) are inside it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from crackscale import storage
from crackscale.config.train import TrainConfig

log = logging.getLogger(__name__)


def keras() -> Any:
    """tf.keras from the tf-keras package (Keras 2), whatever TF_USE_LEGACY_KERAS says.

    Ray 2.60 sets TF_USE_LEGACY_KERAS=1 on Train workers; setting it here too keeps the driver,
    tests and scoring actors on the same Keras flavour that saved the model.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras

    return tf_keras


def mixed_wanted(setting: str, n_gpus: int) -> bool:
    """Whether to compute in float16 (``mixed_precision``: auto = with GPUs; true; false)."""
    return setting == "true" or (setting == "auto" and n_gpus > 0)


@contextmanager
def precision(mixed: bool) -> Iterator[None]:
    """Layers (and models) created inside compute in float16 with float32 variables
    (``mixed_float16``) when ``mixed``, else in float32; the global policy is restored after."""
    policy = keras().mixed_precision
    before = policy.global_policy()
    policy.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        yield
    finally:
        policy.set_global_policy(before)


def pretrained(cfg: TrainConfig) -> bool:
    return cfg.weights.lower() != "none"


def resolve_weights(cfg: TrainConfig) -> str | None:
    """Keras' ``weights=`` argument: 'imagenet', None, or a local file (S3 URIs are downloaded)."""
    w = cfg.weights
    if w.lower() == "none":
        return None
    if w.lower() == "imagenet":
        return "imagenet"
    if storage.is_s3(w):
        import tempfile

        local = os.path.join(tempfile.mkdtemp(prefix="crackscale-w-"), storage.basename(w))
        with open(local, "wb") as f:
            f.write(storage.read_bytes(w, cfg.storage))
        return local
    if not os.path.isfile(w):
        raise FileNotFoundError(f"config key 'weights': file not found: {w}")
    return w


def build(cfg: TrainConfig, load_weights: bool = True, mixed: bool = False) -> tuple[Any, Any]:
    """(model, base), compiled per phase by ``set_phase``.

    ``load_weights=False`` builds the same architecture without loading any weights (to copy
    trained weights into a model outside the distribution strategy). ``mixed``: float16 compute,
    float32 variables; the probability is float32 either way, so the weights of one fit the other.
    """
    with precision(mixed):
        return _build(cfg, load_weights)


def _build(cfg: TrainConfig, load_weights: bool) -> tuple[Any, Any]:
    k = keras()
    weights = resolve_weights(cfg) if load_weights else None
    try:
        base = k.applications.MobileNetV2(
            input_shape=(cfg.image_size, cfg.image_size, 3),
            alpha=cfg.alpha,
            include_top=False,
            weights=weights,
        )
    except Exception as e:  # download failure, wrong file, shape mismatch
        if weights == "imagenet":
            raise RuntimeError(
                "could not load MobileNetV2 ImageNet weights (downloaded by Keras on first use; "
                f"needs internet): {e}. Use weights: none, or a local/S3 .h5 file."
            ) from None
        if weights:
            raise RuntimeError(f"could not load weights from {cfg.weights}: {e}") from None
        raise
    momentum = cfg.bn_momentum or (0.999 if pretrained(cfg) else 0.9)
    for layer in base.layers:
        if isinstance(layer, k.layers.BatchNormalization):
            # from scratch, Keras' 0.999 leaves moving stats at their init for many epochs
            layer.momentum = momentum

    inputs = k.Input((cfg.image_size, cfg.image_size, 3), name="image")
    x = inputs
    if cfg.flip or cfg.flip_vertical:
        both = cfg.flip and cfg.flip_vertical
        mode = "horizontal_and_vertical" if both else "vertical" if cfg.flip_vertical else "horizontal"
        x = k.layers.RandomFlip(mode, name="flip")(x)
    if cfg.rotation > 0:
        x = k.layers.RandomRotation(cfg.rotation, name="rotation")(x)
    if cfg.brightness > 0:
        x = k.layers.RandomBrightness(cfg.brightness, value_range=(0.0, 255.0), name="brightness")(x)
    if cfg.contrast > 0:
        x = k.layers.RandomContrast(cfg.contrast, name="contrast")(x)
    x = k.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(x)
    # pretrained base: BatchNorm stays in inference mode even when unfrozen (Keras fine-tune guide)
    x = base(x, training=False if pretrained(cfg) else None)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    x = k.layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = k.layers.Dense(1, activation="sigmoid", name="crack_probability", dtype="float32")(x)
    return k.Model(inputs, outputs, name="crackscale_mobilenetv2"), base


LAST_CONV = "out_relu"  # MobileNetV2's last convolutional block: where the heatmaps look
HEAD = ("GlobalAveragePooling2D", "Dropout", "Dense")  # what `build` puts after the base


def find_base(model: Any, layer_name: str = LAST_CONV) -> Any:
    """The nested MobileNetV2 of an artifact model (the sub-model that holds ``layer_name``)."""
    for layer in model.layers:
        if hasattr(layer, "layers") and any(sub.name == layer_name for sub in layer.layers):
            return layer
    raise ValueError(f"model {model.name!r} has no nested base model with a layer named {layer_name!r}")


def class_activation(model: Any) -> Any:
    """x (N, H, W, 3 RGB 0..255) → the crack logit's map over the last conv block, (N, h, w) float32:
    Σ_k w_k A_k, with A the base's ``out_relu`` output and w the Dense kernel.

    After ``out_relu`` the head is GAP → Dropout → Dense(1): the logit is the spatial mean of this
    map plus the bias, so Grad-CAM's channel weights (the spatial mean of ∂logit/∂A_k) are w_k / hw
    at every position, and Grad-CAM is ReLU(map) up to that positive factor, which its 0..1
    normalisation removes (Selvaraju et al., 2017, section 3.1: Grad-CAM generalises CAM). The
    map needs no gradient, so a LiteRT export of it draws Grad-CAM's heatmaps without TensorFlow.
    Refuses a model whose head is anything else, where the two would differ."""
    import tensorflow as tf

    base = find_base(model)
    if base.get_layer(LAST_CONV).output is not base.output:
        raise ValueError(f"model {model.name!r}: {LAST_CONV!r} is not the output of its base model")
    at = model.layers.index(base)
    head = model.layers[at + 1 :]
    names = tuple(type(layer).__name__ for layer in head)
    if names != HEAD or head[-1].units != 1:
        raise ValueError(f"model {model.name!r}: head {' → '.join(names)} is not GAP → Dropout → Dense(1)")
    before, dense = model.layers[1:at], head[-1]

    def fn(x: Any) -> Any:
        for layer in before:  # augmentation (inactive at inference), rescaling
            x = layer(x, training=False)
        conv = base(x, training=False)
        w = tf.cast(dense.kernel[:, 0], conv.dtype)
        return tf.cast(tf.tensordot(conv, w, axes=[[3], [0]]), tf.float32)

    return fn


def set_phase(cfg: TrainConfig, model: Any, base: Any, phase: str) -> None:
    """Freeze/unfreeze the base for ``phase`` ('head' or 'fine_tune') and compile."""
    k = keras()
    if phase == "head":
        freeze = cfg.freeze_base == "true" or (cfg.freeze_base == "auto" and pretrained(cfg))
        base.trainable = not freeze
        opt = k.optimizers.Adam(cfg.head_lr)
    else:
        base.trainable = True
        for layer in base.layers[: cfg.fine_tune_at]:
            layer.trainable = False
        opt = k.optimizers.RMSprop(cfg.fine_tune_lr)
    model.compile(
        optimizer=opt,
        loss=k.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[k.metrics.BinaryAccuracy(name="accuracy"), k.metrics.Recall(name="recall"), k.metrics.AUC(name="auc")],
    )


def predict(model: Any, ds: Any) -> np.ndarray:
    """Crack probabilities for a finite (image, label) dataset, no distribution collectives."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    return np.concatenate([fn(x).numpy().reshape(-1) for x, _ in ds]) if ds is not None else np.zeros(0)


def threshold_for_recall(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """Largest threshold whose recall on (y, p) is ≥ target (missing a crack costs most)."""
    pos = np.sort(p[y == 1])
    if len(pos) == 0:
        return 0.5
    # keep at least ceil(target * n) positives at or above the threshold
    k_ = int(np.ceil(target * len(pos)))
    return float(pos[len(pos) - k_]) if k_ > 0 else 1.0


def source_table(y: np.ndarray, p: np.ndarray, names: list[str], threshold: float) -> dict[str, dict[str, Any]]:
    """Per source, in order of first appearance: items, cracks, recall, false alarms (share of
    clean items called crack), precision and ROC-AUC at ``threshold``; a rate with nothing to
    count (recall of a clean-only source) is None."""
    y, p, names_ = np.asarray(y).astype(int), np.asarray(p, dtype=float), np.asarray(names)
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        sel = names_ == name
        ys, ps = y[sel], p[sel]
        called = ps >= threshold
        pos, neg = int(ys.sum()), int((1 - ys).sum())
        tp, fp = int((called & (ys == 1)).sum()), int((called & (ys == 0)).sum())
        auc = roc_auc(ys, ps)
        out[str(name)] = {
            "n": int(len(ys)),
            "cracks": pos,
            "clean": neg,
            "recall": tp / pos if pos else None,
            "false_alarms": fp / neg if neg else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "roc_auc": None if np.isnan(auc) else auc,
            "missed": pos - tp,
            "false_alarm_count": fp,
        }
    return out


def threshold_for_sources(
    y: np.ndarray, p: np.ndarray, names: list[str], targets: dict[str, float], default: float
) -> tuple[float, dict[str, float]]:
    """The highest threshold that keeps each source's recall on its own items at its target
    (``targets``, else ``default``; a source without cracks sets none), and each source's own
    threshold. With one target for all, pooled recall then holds too."""
    y, p, names_ = np.asarray(y).astype(int), np.asarray(p, dtype=float), np.asarray(names)
    own = {
        str(n): threshold_for_recall(y[names_ == n], p[names_ == n], targets.get(str(n), default))
        for n in dict.fromkeys(names)
        if (y[names_ == n] == 1).any()
    }
    return (min(own.values()) if own else threshold_for_recall(y, p, default)), own


def metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy, precision, recall, ROC-AUC, confusion matrix at ``threshold``."""
    y = y.astype(int)
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    n = len(y)
    return {
        "n": n,
        "threshold": float(threshold),
        "accuracy": (tp + tn) / n if n else 0.0,
        "accuracy_at_0.5": float(((p >= 0.5).astype(int) == y).mean()) if n else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "roc_auc": roc_auc(y, p),
        "loss": float(-np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1))))
        if n
        else 0.0,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann–Whitney ROC-AUC with ties counted half."""
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(allv))
    r[order] = ranks
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
