"""What each Ray Train worker runs: build the model inside the strategy scope, restore the last
checkpoint, evaluate before, train the head phase then the fine-tune phase (EarlyStopping per phase,
a checkpoint every epoch), evaluate after; rank 0 picks the decision threshold on validation and
writes the model artifact."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from crackscale import artifact
from crackscale import model as M
from crackscale.config.loader import dump, from_dict, to_dict
from crackscale.config.train import TrainConfig
from crackscale.training import tfdata
from crackscale.training.strategy import make_strategy, multi_device

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.npz"
AVERAGED_FILE = "averaged_{epoch}.npz"  # swa_epochs: one of the head phase's last epochs, for a resume


def _distributed(strategy: Any, images: list[bytes], labels: list[int], cfg: TrainConfig, training: bool) -> Any:
    per_replica = max(1, cfg.batch_size // strategy.num_replicas_in_sync)
    autotune = not multi_device(strategy)

    def fn(ctx: Any) -> Any:
        return tfdata.tf_dataset(
            images,
            labels,
            cfg.image_size,
            per_replica,
            shuffle=training,
            seed=cfg.seed + ctx.input_pipeline_id,
            repeat=True,
            shard=(ctx.num_input_pipelines, ctx.input_pipeline_id),
            antialias=cfg.resize_antialias,
            autotune=autotune,
        )

    return strategy.distribute_datasets_from_function(fn)


def _in_order(cfg: TrainConfig, images: list[bytes], labels: list[int], autotune: bool = True) -> Any:
    """``images`` decoded and resized as for evaluation, in order, batches of 64."""
    return tfdata.tf_dataset(
        images,
        labels,
        cfg.image_size,
        64,
        shuffle=False,
        seed=0,
        repeat=False,
        antialias=cfg.resize_antialias,
        autotune=autotune,
    )


def _scores(y: np.ndarray, p: np.ndarray, cfg: TrainConfig, threshold: float | None) -> dict[str, Any]:
    """Metrics at ``threshold``, or at the threshold for ``target_recall`` on (y, p) when None."""
    if not len(y):
        return {}
    thr = threshold if threshold is not None else M.threshold_for_recall(y, p, cfg.target_recall)
    return M.metrics(y, p, thr)


class _DriverSplits:
    """``ingest: driver``: every split's image bytes, from the object store, in manifest order."""

    def __init__(self, config: dict[str, Any], cfg: TrainConfig, autotune: bool) -> None:
        import ray

        self.cfg, self.config, self.autotune = cfg, config, autotune
        self.splits = ray.get(config["data"])

    def fit_data(self, strategy: Any, split: str, training: bool) -> tuple[Any, int]:
        images, labels = self.splits[split]
        return _distributed(strategy, images, labels, self.cfg, training), tfdata.steps(
            len(images), self.cfg.batch_size
        )

    def predict(self, mdl: Any, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(probabilities, labels, uris) of every image of ``split``."""
        images, labels = self.splits[split]
        p = M.predict(mdl, _in_order(self.cfg, images, labels, self.autotune)) if images else np.zeros(0)
        uris = self.config["test_uris"] if split == "test" else [""] * len(images)
        return p, np.asarray(labels), uris

    def export_images(self) -> tuple[list[bytes], list[bytes], list[bytes], list[int]]:
        """(64 validation images for the parity checks, the int8 calibration images, the images and
        labels the int8 export is measured on), as encoded bytes."""
        (tr_x, tr_y), (va_x, va_y) = self.splits["train"], self.splits["val"]
        vx, vy = measured(va_x, va_y, self.cfg.seed)
        return va_x[:64], representative(tr_x, tr_y, self.cfg.seed), vx, vy


class _RayDataSplits:
    """``ingest: ray_data``: this worker's shards of train and val, the whole of val and test, and
    the few images the exports need, read from storage by URI."""

    def __init__(self, config: dict[str, Any], cfg: TrainConfig, world_size: int, autotune: bool) -> None:
        self.cfg, self.config, self.world, self.autotune = cfg, config, world_size, autotune

    def fit_data(self, strategy: Any, split: str, training: bool) -> tuple[Any, int]:
        from crackscale.training import raydata

        per_replica = max(1, self.cfg.batch_size // strategy.num_replicas_in_sync)
        replicas = strategy.num_replicas_in_sync // self.world
        rows = self.config["rows"][split] // self.world  # streaming_split(equal=True) drops the rest
        steps: list[int] = []

        def fn(ctx: Any) -> Any:
            ds, n = raydata.worker_dataset(
                split, rows, self.cfg, per_replica, replicas, training, self.cfg.seed + ctx.input_pipeline_id
            )
            steps.append(n)
            return ds if self.autotune else ds.with_options(tfdata.no_autotune_options())

        ds = strategy.distribute_datasets_from_function(fn)
        return ds, steps[0]

    def predict(self, mdl: Any, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        import tensorflow as tf

        from crackscale.training import raydata

        fn = tf.function(lambda x: mdl(x, training=False))
        p, y, uris = [], [], []
        for x, labels, names in raydata.evaluation_batches("val_all" if split == "val" else split):
            p.append(fn(x).numpy().reshape(-1))
            y.append(labels)
            uris.extend(names)
        return (np.concatenate(p) if p else np.zeros(0)), (np.concatenate(y) if y else np.zeros(0)), uris

    def export_images(self) -> tuple[list[bytes], list[bytes], list[bytes], list[int]]:
        from crackscale import storage

        picks = self.config["export_uris"]

        def read(uris: list[str]) -> list[bytes]:
            return storage.read_many(uris, self.cfg.storage)

        return read(picks["check"]), read(picks["representative"]), read(picks["measured"]), picks["measured_labels"]


class _ResumableEarlyStopping:
    """Keras EarlyStopping whose best/wait survive a restart from a checkpoint."""

    def __new__(cls, initial: dict[str, Any] | None, **kwargs: Any) -> Any:
        k = M.keras()

        class Impl(k.callbacks.EarlyStopping):
            def on_train_begin(self, logs: Any = None) -> None:
                super().on_train_begin(logs)
                if initial:
                    self.best = initial["best"]
                    self.wait = initial["wait"]
                    self.best_weights = self.model.get_weights()

        return Impl(**kwargs)


class _Reporter:
    """Keras callback: report metrics to Ray Train every epoch, with a checkpoint from rank 0
    (and the averager's epochs so far, when weights are averaged)."""

    def __new__(cls, state: dict[str, Any], phase: str, es: Any, rank: int, averager: Any = None) -> Any:
        k = M.keras()
        import ray.train

        class Impl(k.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                logs = {key: float(v) for key, v in (logs or {}).items()}
                stopping = bool(self.model.stop_training) or epoch + 1 >= state["phase_end"]
                entry = {"epoch": epoch + 1, "phase": phase, **logs, "epoch_s": round(time.perf_counter() - self.t0, 3)}
                state["history"].append(entry)
                state["epoch"] = epoch + 1
                state["es"] = {"best": float(es.best), "wait": int(es.wait)}
                if stopping:
                    state["phase"] = "fine_tune" if phase == "head" else "done"
                # at a phase's end Keras restores the best epoch: checkpoint those weights.
                # Every rank reads the weights: under MWMS reading sync-on-read variables is a
                # collective, so a chief-only read would deadlock.
                weights = es.best_weights if (stopping and es.best_weights is not None) else None
                weights = weights if weights is not None else self.model.get_weights()
                metrics = {**entry, "training_iteration_global": epoch + 1}
                if rank != 0:
                    ray.train.report(metrics, checkpoint=None)
                    return
                with tempfile.TemporaryDirectory() as tmp:
                    save_weights(weights, os.path.join(tmp, WEIGHTS_FILE))
                    Path(tmp, STATE_FILE).write_text(json.dumps(state))
                    if averager is not None and not stopping:
                        save_averaged(averager.last, tmp)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

        return Impl()


class _Averager:
    """Keras callback, stochastic weight averaging (Izmailov et al., 2018): the phase's last epoch
    ends with the mean of the weights after each of its last ``n`` epochs, then ``recompute``
    refits BatchNorm's moving statistics to them (averaged statistics do not fit the averaged
    convolutions of a network trained from scratch). ``initial``: (epoch, weights) pairs a
    resumed run carries over from its checkpoint."""

    def __new__(cls, n: int, es: Any, state: dict[str, Any], initial: list, recompute: Any) -> Any:
        k = M.keras()
        from collections import deque

        class Impl(k.callbacks.Callback):
            def on_train_begin(self, logs: Any = None) -> None:
                self.last: deque[tuple[int, list[np.ndarray]]] = deque(initial, maxlen=n)

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                self.last.append((epoch + 1, self.model.get_weights()))
                if not (self.model.stop_training or epoch + 1 >= self.params["epochs"]):
                    return
                weights = [w for _, w in self.last]
                self.model.set_weights([np.mean(ws, axis=0) for ws in zip(*weights)])
                recompute(self.model)
                state["averaged_epochs"] = [e for e, _ in self.last]
                log.info("weights averaged over epochs %s", state["averaged_epochs"])
                # EarlyStopping restores its best weights when fit ends, and this epoch's
                # checkpoint saves them: make both the averaged model
                es.best_weights = self.model.get_weights()

        return Impl()


def save_averaged(last: Any, directory: str) -> None:
    """The averager's (epoch, weights) pairs, one ``save_weights`` file per epoch."""
    for epoch, weights in last:
        save_weights(weights, os.path.join(directory, AVERAGED_FILE.format(epoch=epoch)))


def load_averaged(directory: str) -> list[tuple[int, list[np.ndarray]]]:
    epochs = sorted(int(p.stem.split("_")[1]) for p in Path(directory).glob(AVERAGED_FILE.format(epoch="*")))
    return [(e, load_weights(os.path.join(directory, AVERAGED_FILE.format(epoch=e)))) for e in epochs]


def recompute_batchnorm(mdl: Any, strategy: Any, data: Any, steps: int) -> None:
    """Reset every BatchNorm layer's moving mean and variance to their exact average over ``steps``
    training batches of ``data`` under the current weights: one forward pass in training mode per
    batch, batch t weighted 1/(t + 1) into the running mean (momentum t / (t + 1)). Runs eagerly
    so the changing momentum is read at every call."""
    k = M.keras()
    layers = [layer for layer in mdl.submodules if isinstance(layer, k.layers.BatchNormalization)]
    saved = [layer.momentum for layer in layers]
    batches = iter(data)
    try:
        for t in range(steps):
            for layer in layers:
                layer.momentum = t / (t + 1)
            x, _ = next(batches)
            strategy.run(lambda x: mdl(x, training=True), args=(x,))
    finally:
        for layer, m in zip(layers, saved):
            layer.momentum = m
    log.info("BatchNorm statistics recomputed on %d training batches", steps)


def phase_lr(lr0: float, i: int, n: int, cosine: bool, warmup: int = 0) -> float:
    """Learning rate of epoch ``i`` (0-based) of an ``n``-epoch phase: ``warmup`` epochs rising
    linearly to ``lr0``, then constant or a half-cosine decay over the epochs left."""
    if i < warmup:
        return float(lr0 * (i + 1) / (warmup + 1))
    if not cosine:
        return float(lr0)
    i, n = i - warmup, n - warmup
    return float(lr0 * 0.5 * (1 + np.cos(np.pi * min(max(i, 0), n) / n)))


def save_weights(weights: list[np.ndarray], path: str) -> None:
    """A model's ``get_weights()`` list as .npz (order = the model's weight order)."""
    np.savez(path, *weights)


def load_weights(path: str) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


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
    es = _ResumableEarlyStopping(
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
        averager = _Averager(
            cfg.swa_epochs, es, state, averaged, lambda m: recompute_batchnorm(m, strategy, train[0], train[1])
        )
    # identical callbacks on every worker (Keras/MWMS practice): non-chief TensorBoard writes to
    # a throwaway local dir; diverging callback lists can desynchronise collectives.
    # The averager runs after EarlyStopping has decided and before the checkpoint is written.
    callbacks = [es, k.callbacks.TensorBoard(log_dir=tb_dir), _Reporter(state, phase, es, rank, averager)]
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


def predictions_csv(uris: list[str], labels: list[int], probs: np.ndarray) -> str:
    """Per-image test scores as CSV (``csv`` quoting, so every URI reads back as it is)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("uri", "label", "probability"))
    w.writerows((u, int(y), repr(float(p))) for u, y, p in zip(uris, labels, probs))
    return buf.getvalue()


def _save_artifact(
    cfg: TrainConfig,
    config: dict[str, Any],
    weights: list[np.ndarray],
    meta: dict[str, Any],
    test: tuple[list[str], np.ndarray, np.ndarray],
    exports: tuple[list[bytes], list[bytes], list[bytes], list[int]],
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
    te_uris, te_y, te_p = test
    Path(extra, "test_predictions.csv").write_text(predictions_csv(te_uris, te_y, te_p))
    if Path(tb_dir).is_dir():
        shutil.copytree(tb_dir, Path(extra, "tensorboard"))
    # the LiteRT exports are checked on real validation images, decoded as for training
    check_x, rep_x, vx, vy = exports
    check = decoded(cfg, check_x)
    int8 = None
    if cfg.int8:
        int8 = artifact.Int8Data(decoded(cfg, rep_x), decoded(cfg, vx), np.asarray(vy))
    artifact.save(plain, meta, config["output"], extra_dir=extra, cfg=cfg.storage, check_images=check, int8=int8)


def representative(images: list[bytes], labels: list[int], seed: int, n: int = 200) -> list[bytes]:
    """Up to ``n`` training images for int8 calibration, half of each class, seeded."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    picks = [rng.permutation(np.flatnonzero(y == c))[: n // 2] for c in (0, 1)]
    return [images[i] for i in sorted(np.concatenate(picks).astype(int))]


MEASURED_MAX = 2000  # validation images the int8 export is measured on (decoded at once, in memory)


def measured(images: list, labels: list[int], seed: int, n: int = MEASURED_MAX) -> tuple[list, list[int]]:
    """The validation images the int8 export is measured on: all of them, or ``n`` seeded ones."""
    if len(images) <= n:
        return images, labels
    keep = sorted(np.random.default_rng(seed).permutation(len(images))[:n].tolist())
    return [images[i] for i in keep], [labels[i] for i in keep]


def decoded(cfg: TrainConfig, images: list[bytes]) -> np.ndarray:
    """Encoded images as the model sees them at evaluation (NHWC float32 0..255)."""
    if not images:
        return np.zeros((0, cfg.image_size, cfg.image_size, 3), np.float32)
    return np.concatenate([x.numpy() for x, _ in _in_order(cfg, images, [0] * len(images))])


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
        _RayDataSplits(config, cfg, world, autotune)
        if config.get("ingest") == "ray_data"
        else _DriverSplits(config, cfg, autotune)
    )
    mdl, base, state, averaged = _restore(cfg, config, strategy)

    tb_dir = tempfile.mkdtemp(prefix="crackscale-tb-")
    # Every worker runs the same evaluations: MWMS needs identical op/variable-creation order on
    # all workers (a chief-only predict desynchronises collectives). Only rank 0 keeps results.
    if not state.get("before"):
        state["before"] = {}
        for split in ("val", "test"):
            p, y, _ = splits.predict(mdl, split)
            state["before"][split] = _scores(y, p, cfg, 0.5)

    train = splits.fit_data(strategy, "train", training=True)
    val = splits.fit_data(strategy, "val", training=False)
    with strategy.scope():
        for phase in ("head", "fine_tune"):
            if state["phase"] == phase:
                _fit_phase(mdl, base, cfg, phase, state, train, val, rank, tb_dir, averaged)

    final: dict[str, Any] = {"epochs_run": state["epoch"]}
    va_p, va_y, _ = splits.predict(mdl, "val")
    val_m = _scores(va_y, va_p, cfg, None)
    te_p, te_y, te_uris = splits.predict(mdl, "test")
    test_m = _scores(te_y, te_p, cfg, val_m["threshold"])
    weights = mdl.get_weights()  # on every rank (a collective under MWMS)
    if rank == 0:
        after = {"val": val_m, "test": test_m}
        meta = _model_meta(cfg, config, state, after, world, strategy, strategy_name)
        _save_artifact(cfg, config, weights, meta, (te_uris, te_y, te_p), splits.export_images(), tb_dir)
        final.update({f"test_{k_}": v for k_, v in test_m.items() if isinstance(v, (int, float))})
        final.update({f"val_{k_}": v for k_, v in val_m.items() if isinstance(v, (int, float))})
        final["artifact"] = config["output"]
    ray.train.report(final, checkpoint=None)
