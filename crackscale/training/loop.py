"""What each Ray Train worker runs: build the model inside the strategy scope, restore the last
checkpoint, evaluate before, train the head phase then the fine-tune phase (EarlyStopping per phase,
a checkpoint every epoch), evaluate after; rank 0 picks the decision threshold on validation and
writes the model artifact."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from crackscale import artifact
from crackscale import model as M
from crackscale.config.loader import dump, from_dict, to_dict
from crackscale.config.train import TrainConfig
from crackscale.training.callbacks import (
    STATE_FILE,
    WEIGHTS_FILE,
    Averager,
    Reporter,
    ResumableEarlyStopping,
    load_averaged,
    load_weights,
    phase_lr,
    recompute_batchnorm,
)
from crackscale.training.inputs import DriverSplits, RayDataSplits, decoded
from crackscale.training.quality import (
    predictions_csv,
    scores,
    source_targets,
    threshold_for_every_source,
)
from crackscale.training.strategy import make_strategy, multi_device

log = logging.getLogger(__name__)


def _fit_phase(
    mdl: Any,
    base: Any,
    cfg: TrainConfig,
    phase: str,
    state: dict[str, Any],
    train: tuple[Any, int],
    val: tuple[Any, int],
    rank: int,
    tb_dir: str,
    averaged: list,
) -> None:
    """One phase's ``fit``; ``train`` and ``val`` are (distributed dataset, steps per epoch);
    ``averaged``: the (epoch, weights) pairs a resumed head phase had kept for its average."""
    k = M.keras()
    epochs = cfg.head_epochs if phase == "head" else cfg.fine_tune_epochs
    if epochs == 0:
        state["phase"] = "fine_tune" if phase == "head" else "done"
        return
    M.set_phase(cfg, mdl, base, phase)
    if state.get("phase_start") is None or state.get("phase_name") != phase:
        state["phase_start"] = state["epoch"]
        state["phase_name"] = phase
        state["es"] = None
    state["phase_end"] = state["phase_start"] + epochs
    # start_from_epoch counts absolute epochs: phase 2 starts after phase 1's
    es = ResumableEarlyStopping(
        state.get("es"),
        monitor="val_loss",
        patience=cfg.patience,
        restore_best_weights=True,
        start_from_epoch=state["phase_start"] + cfg.min_epochs,
    )
    averager = None
    if phase == "head" and cfg.swa_epochs:
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()  # _fit_phase runs inside the worker's strategy scope
        averager = Averager(
            cfg.swa_epochs, es, state, averaged, lambda m: recompute_batchnorm(m, strategy, train[0], train[1])
        )
    # identical callbacks on every worker (Keras/MWMS practice): non-chief TensorBoard writes to
    # a throwaway local dir; diverging callback lists can desynchronise collectives.
    # The averager runs after EarlyStopping has decided and before the checkpoint is written.
    callbacks = [es, k.callbacks.TensorBoard(log_dir=tb_dir), Reporter(state, phase, es, rank, averager)]
    if averager is not None:
        callbacks.insert(1, averager)
    warmup = cfg.warmup_epochs if phase == "head" else 0
    if cfg.lr_schedule == "cosine" or warmup:  # keyed on the absolute epoch: a resumed run continues the curve
        lr0, start = (cfg.head_lr if phase == "head" else cfg.fine_tune_lr), state["phase_start"]
        cosine = cfg.lr_schedule == "cosine"
        schedule = lambda epoch, _lr: phase_lr(lr0, epoch - start, epochs, cosine, warmup)  # noqa: E731
        callbacks.insert(0, k.callbacks.LearningRateScheduler(schedule))
    log.info("phase %s: epochs %d..%d", phase, state["epoch"] + 1, state["phase_end"])
    mdl.fit(
        train[0],
        epochs=state["phase_end"],
        initial_epoch=state["epoch"],
        steps_per_epoch=train[1],
        validation_data=val[0],
        validation_steps=val[1],
        callbacks=callbacks,
        verbose=2,
    )


def mixed(cfg: TrainConfig) -> bool:
    """Whether this worker trains in mixed precision (``mixed_precision``, its visible GPUs)."""
    import tensorflow as tf

    return M.mixed_wanted(cfg.mixed_precision, len(tf.config.list_physical_devices("GPU")) if cfg.use_gpu else 0)


def _restore(cfg: TrainConfig, config: dict[str, Any], strategy: Any) -> tuple[Any, Any, dict[str, Any], list]:
    """(model, base, training state, the averager's kept epochs): built in the strategy's scope, from
    the last checkpoint if any.
    A Tune trial restored by PBT (exploit) or ``--resume`` starts a fresh Train run from
    ``initial_checkpoint``."""
    import ray.train

    state: dict[str, Any] = {"phase": "head", "epoch": 0, "history": [], "es": None}
    averaged: list = []
    ckpt = ray.train.get_checkpoint() or config.get("initial_checkpoint")
    with strategy.scope():
        mdl, base = M.build(cfg, mixed=mixed(cfg))
        if ckpt:
            with ckpt.as_directory() as d:
                state = json.loads(Path(d, STATE_FILE).read_text())
                mdl.set_weights(load_weights(os.path.join(d, WEIGHTS_FILE)))
                averaged = load_averaged(d)
            state.setdefault("resumed_at_epochs", []).append(state["epoch"])
            log.info("resumed at epoch %d (phase %s)", state["epoch"], state["phase"])
    return mdl, base, state, averaged


def _model_meta(
    cfg: TrainConfig,
    config: dict[str, Any],
    state: dict[str, Any],
    after: dict[str, Any],
    workers: int,
    strategy: Any,
    strategy_name: str,
) -> dict[str, Any]:
    """model.json: what a scorer needs (classes, input, preprocessing, threshold) and what an auditor
    needs (metrics before and after, config, data manifest hash, versions, history)."""
    return {
        "name": config["name"],
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "class_names": list(cfg.class_names),
        "crack_class": cfg.crack_class,
        "image_size": cfg.image_size,
        # the crops it learned from: scoring cuts larger photos into tiles of this side
        "source_size": cfg.source_size or int(config["data_stats"].get("source_size", 0)),
        "input": {
            "dtype": "float32",
            "shape": [None, cfg.image_size, cfg.image_size, 3],
            "range": [0, 255],
            "channels": "RGB",
        },
        "resize_antialias": cfg.resize_antialias,
        "preprocessing": (
            "decode JPEG/PNG to RGB, resize to image_size x image_size "
            f"(bilinear, antialias={cfg.resize_antialias}), float32 0..255; the model applies "
            "MobileNetV2 scaling (x/127.5 - 1) itself"
        ),
        "output": "sigmoid probability of crack_class, shape [N, 1]",
        "threshold": after["val"]["threshold"],
        "target_recall": cfg.target_recall,
        "target_recall_by_source": source_targets(cfg),
        # photo sets were cut on this grid: score with the same tile_overlap and tile_above
        "tiles": {"overlap": cfg.tile_overlap, "above": cfg.tile_above},
        "metrics": {"before": state["before"], "after": after},
        "config": to_dict(cfg),
        "manifest_hash": config["manifest_hash"],
        "data_stats": config["data_stats"],
        "versions": artifact.versions(),
        "history": state["history"],
        "resumed_at_epochs": state.get("resumed_at_epochs", []),
        "averaged_epochs": state.get("averaged_epochs", []),
        "num_workers": workers,
        "num_replicas": strategy.num_replicas_in_sync,
        "strategy": strategy_name,
        "mixed_precision": {"training": mixed(cfg)},
    }


def _save_artifact(
    cfg: TrainConfig,
    config: dict[str, Any],
    weights: list[np.ndarray],
    meta: dict[str, Any],
    test: tuple[list[str], np.ndarray, np.ndarray, list[str]],
    exports: tuple[list[bytes], list[bytes], list[bytes], list[int], list[str]],
    tb_dir: str,
) -> None:
    """Rank 0: the trained weights in a plain model (no strategy), with config.yaml, manifest.csv,
    the per-image test scores and the TensorBoard logs beside it, saved as the model artifact."""
    import shutil

    plain, _ = M.build(cfg, load_weights=False)
    plain.set_weights(weights)
    extra = tempfile.mkdtemp(prefix="crackscale-extra-")
    Path(extra, "config.yaml").write_text(dump(cfg))
    manifest = config.get("manifest_csv")
    if manifest is None:  # ingest: ray_data: the driver wrote it beside the run, too large to pass here
        from crackscale import storage

        manifest = storage.read_text(config["manifest_uri"], cfg.storage)
    Path(extra, "manifest.csv").write_text(manifest)
    # per-image test scores: reports (ROC/PR curves, misclassified grid) need nothing else
    te_uris, te_y, te_p, te_names = test
    Path(extra, "test_predictions.csv").write_text(predictions_csv(te_uris, te_y, te_p, te_names))
    if Path(tb_dir).is_dir():
        shutil.copytree(tb_dir, Path(extra, "tensorboard"))
    # the LiteRT exports are checked on real validation images, decoded as for training
    check_x, rep_x, vx, vy, vn = exports
    check = decoded(cfg, check_x)
    int8 = None
    if cfg.int8:
        int8 = artifact.Int8Data(decoded(cfg, rep_x), decoded(cfg, vx), np.asarray(vy), vn)
    artifact.save(plain, meta, config["output"], extra_dir=extra, cfg=cfg.storage, check_images=check, int8=int8)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (module level so Ray can pickle it by reference)."""
    import ray
    import ray.train
    import tensorflow as tf

    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    strategy, strategy_name = make_strategy(ctx.get_world_size())
    autotune = not multi_device(strategy)
    world = ctx.get_world_size()
    splits: Any = (
        RayDataSplits(config, cfg, world, autotune)
        if config.get("ingest") == "ray_data"
        else DriverSplits(config, cfg, autotune)
    )
    mdl, base, state, averaged = _restore(cfg, config, strategy)

    tb_dir = tempfile.mkdtemp(prefix="crackscale-tb-")
    # Every worker runs the same evaluations: MWMS needs identical op/variable-creation order on
    # all workers (a chief-only predict desynchronises collectives). Only rank 0 keeps results.
    if not state.get("before"):
        state["before"] = {}
        for split in ("val", "test"):
            p, y, _, _ = splits.predict(mdl, split)
            state["before"][split] = scores(y, p, cfg, 0.5)

    train = splits.fit_data(strategy, "train", training=True)
    val = splits.fit_data(strategy, "val", training=False)
    with strategy.scope():
        for phase in ("head", "fine_tune"):
            if state["phase"] == phase:
                _fit_phase(mdl, base, cfg, phase, state, train, val, rank, tb_dir, averaged)

    final: dict[str, Any] = {"epochs_run": state["epoch"]}
    va_p, va_y, _, va_names = splits.predict(mdl, "val")
    # the threshold keeps target_recall on every source's validation items, not only on all of them
    threshold, own = threshold_for_every_source(va_y, va_p, va_names, cfg)
    val_m = scores(va_y, va_p, cfg, threshold)
    te_p, te_y, te_uris, te_names = splits.predict(mdl, "test")
    test_m = scores(te_y, te_p, cfg, threshold)
    weights = mdl.get_weights()  # on every rank (a collective under MWMS)
    if rank == 0:
        after = {
            "val": val_m,
            "test": test_m,
            "threshold_by_source": own,
            "per_source": {
                "val": M.source_table(va_y, va_p, va_names, threshold),
                "test": M.source_table(te_y, te_p, te_names, threshold),
            },
        }
        meta = _model_meta(cfg, config, state, after, world, strategy, strategy_name)
        test = (te_uris, te_y, te_p, te_names)
        _save_artifact(cfg, config, weights, meta, test, splits.export_images(), tb_dir)
        final.update({f"test_{k_}": v for k_, v in test_m.items() if isinstance(v, (int, float))})
        final.update({f"val_{k_}": v for k_, v in val_m.items() if isinstance(v, (int, float))})
        final["artifact"] = config["output"]
    ray.train.report(final, checkpoint=None)
