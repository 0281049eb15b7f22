"""Model construction (weights from a file or S3, BN momentum), threshold and metrics."""

import numpy as np
import pytest

from crackscale import model as M
from crackscale.config.train import TrainConfig


def _base_weights_file(tmp_path, size=64, alpha=0.35):
    k = M.keras()
    base = k.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None)
    path = tmp_path / "mobilenet_v2_no_top.h5"
    base.save_weights(str(path))
    return base, path


def test_weights_from_a_file_and_from_s3(tmp_path, s3_server, s3_bucket):
    ref, path = _base_weights_file(tmp_path)
    cfg = TrainConfig(weights=str(path), image_size=64, alpha=0.35)
    mdl, base = M.build(cfg)
    for a, b in zip(ref.get_weights(), base.get_weights()):
        np.testing.assert_array_equal(a, b)
    # pretrained: BN keeps Keras' momentum, base frozen in the head phase
    bns = [l for l in base.layers if isinstance(l, M.keras().layers.BatchNormalization)]
    assert bns and all(l.momentum == 0.999 for l in bns)
    M.set_phase(cfg, mdl, base, "head")
    assert not base.trainable
    M.set_phase(cfg, mdl, base, "fine_tune")
    assert not base.layers[cfg.fine_tune_at - 1].trainable and base.layers[cfg.fine_tune_at].trainable

    import boto3

    boto3.client("s3", endpoint_url=s3_server).upload_file(str(path), s3_bucket, "weights/w.h5")
    _, base2 = M.build(TrainConfig(weights=f"s3://{s3_bucket}/weights/w.h5", image_size=64, alpha=0.35))
    np.testing.assert_array_equal(ref.get_weights()[0], base2.get_weights()[0])


def test_from_scratch_defaults_and_bad_weights(tmp_path):
    cfg = TrainConfig(weights="none", image_size=64, alpha=0.35)
    mdl, base = M.build(cfg)
    bns = [l for l in base.layers if isinstance(l, M.keras().layers.BatchNormalization)]
    assert all(l.momentum == 0.9 for l in bns)  # the from-scratch BN trap (NOTES.md)
    M.set_phase(cfg, mdl, base, "head")
    assert base.trainable  # nothing to freeze without pretrained weights
    # raw pixels in, P(crack) out, preprocessing inside the model
    out = mdl.predict(np.full((2, 64, 64, 3), 255.0, np.float32), verbose=0)
    assert out.shape == (2, 1) and np.all((out >= 0) & (out <= 1))
    assert any(l.name == "preprocess" for l in mdl.layers)
    with pytest.raises(FileNotFoundError, match="config key 'weights': file not found"):
        M.build(TrainConfig(weights=str(tmp_path / "nope.h5"), image_size=64, alpha=0.35))
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(RuntimeError, match="could not load weights from"):
        M.build(TrainConfig(weights=str(bad), image_size=64, alpha=0.35))


def test_threshold_keeps_target_recall():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200), np.zeros(200)].astype(int)
    p = np.r_[rng.beta(5, 2, 200), rng.beta(2, 5, 200)]
    for target in (0.9, 0.95, 0.99, 1.0):
        thr = M.threshold_for_recall(y, p, target)
        m = M.metrics(y, p, thr)
        assert m["recall"] >= target
        # the highest such threshold: any higher one loses recall
        higher = np.min(p[p > thr]) if np.any(p > thr) else None
        if higher is not None:
            assert M.metrics(y, p, higher)["recall"] < target


def test_metrics_match_brute_force():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.uniform(size=300), 2)  # ties on purpose
    pos, neg = p[y == 1], p[y == 0]
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    m = M.metrics(y, p, 0.5)
    assert m["roc_auc"] == pytest.approx(brute)
    cm = m["confusion_matrix"]
    assert cm["tp"] + cm["fn"] == y.sum() and cm["tn"] + cm["fp"] == (y == 0).sum()
    assert m["accuracy"] == pytest.approx(((p >= 0.5) == y).mean())


def test_mixed_precision_computes_in_float16_with_float32_weights_and_output():
    """The mixed model's layers compute in float16, its variables and its probability stay float32,
    so weights move between the two builds both ways; the global policy is restored after."""
    k = M.keras()
    cfg = TrainConfig(weights="none", image_size=64, alpha=0.35, bn_momentum=0.7)
    full, _ = M.build(cfg)
    half, base = M.build(cfg, load_weights=False, mixed=True)
    assert k.mixed_precision.global_policy().name == "float32"
    convs = [layer for layer in base.layers if isinstance(layer, k.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "float16" for layer in convs)
    assert all(w.dtype == np.float32 for w in half.get_weights())
    half.set_weights(full.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (8, 64, 64, 3)).astype(np.float32)
    p16, p32 = half(x, training=False).numpy(), full(x, training=False).numpy()
    assert p16.dtype == np.float32 and np.abs(p16 - p32).max() < 0.01
    # training in float16 wraps the optimizer in loss scaling
    M.set_phase(cfg, half, base, "head")
    assert isinstance(half.optimizer, k.mixed_precision.LossScaleOptimizer)


def test_crack_augmentations_train_only_and_label_smoothing():
    """Vertical flips, brightness and contrast change training inputs and leave inference alone;
    label smoothing reaches the loss."""
    k = M.keras()
    cfg = TrainConfig(
        weights="none",
        image_size=32,
        alpha=0.35,
        flip=True,
        flip_vertical=True,
        rotation=0.0,
        brightness=0.2,
        contrast=0.3,
        label_smoothing=0.1,
    )
    mdl, base = M.build(cfg)
    names = {layer.name for layer in mdl.layers}
    assert {"flip", "brightness", "contrast"} <= names and "rotation" not in names
    assert mdl.get_layer("flip").mode == "horizontal_and_vertical"
    front = k.Model(mdl.input, mdl.get_layer("contrast").output)
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(front(x, training=False).numpy(), x)
    assert np.abs(front(x, training=True).numpy() - x).max() > 1.0
    M.set_phase(cfg, mdl, base, "head")
    assert mdl.loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    assert (
        M.build(TrainConfig(weights="none", image_size=32, alpha=0.35, flip=False, flip_vertical=True))[0]
        .get_layer("flip")
        .mode
        == "vertical"
    )
