"""Distributed two-phase MobileNetV2 training with Ray Train (DataParallelTrainer + MWMS).

Driver: scan/dedup/split the data once, put the image bytes in Ray's object store (so workers on
any node get them without shared storage), start a ``DataParallelTrainer`` whose backend
(``crackscale.tf_backend``) gives each worker its ``TF_CONFIG``. Each worker: a
``MultiWorkerMirroredStrategy`` over all workers and their local GPUs, its shard of the data, head
phase (Adam, base frozen when pretrained) then fine-tune phase (RMSprop, base from
``fine_tune_at``), EarlyStopping per phase, a checkpoint every epoch. Rank 0 evaluates before and
after, picks the decision threshold on validation, and writes the model artifact.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from crackscale import artifact, data, storage
from crackscale import model as M
from crackscale.config import ConfigError, TrainConfig, dump, from_dict, to_dict

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.npz"


# ---- worker side ------------------------------------------------------------------------------

def _distributed(strategy: Any, images: list[bytes], labels: list[int], cfg: TrainConfig,
                 training: bool) -> Any:
    per_replica = max(1, cfg.batch_size // strategy.num_replicas_in_sync)
    autotune = not _multi_device(strategy)

    def fn(ctx: Any) -> Any:
        return data.tf_dataset(images, labels, cfg.image_size, per_replica, shuffle=training,
                               seed=cfg.seed + ctx.input_pipeline_id, repeat=True,
                               shard=(ctx.num_input_pipelines, ctx.input_pipeline_id),
                               antialias=cfg.resize_antialias, autotune=autotune)

    return strategy.distribute_datasets_from_function(fn)


def _multi_device(strategy: Any) -> bool:
    """True under MWMS or MirroredStrategy: their input goes through a MultiDeviceIterator, and its
    pipelines run without tf.data autotuning (see data.no_autotune_options)."""
    import tensorflow as tf

    return isinstance(strategy, (tf.distribute.MultiWorkerMirroredStrategy, tf.distribute.MirroredStrategy))


def _evaluate(mdl: Any, images: list[bytes], labels: list[int], cfg: TrainConfig,
              threshold: float | None = None, autotune: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    if not images:
        return {}, np.zeros(0)
    ds = data.tf_dataset(images, labels, cfg.image_size, 64, shuffle=False, seed=0, repeat=False,
                         antialias=cfg.resize_antialias, autotune=autotune)
    p = M.predict(mdl, ds)
    y = np.asarray(labels)
    thr = threshold if threshold is not None else M.threshold_for_recall(y, p, cfg.target_recall)
    return M.metrics(y, p, thr), p


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
    """Keras callback: report metrics to Ray Train every epoch, with a checkpoint from rank 0."""

    def __new__(cls, state: dict[str, Any], phase: str, es: Any, rank: int) -> Any:
        k = M.keras()
        import ray.train

        class Impl(k.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                logs = {key: float(v) for key, v in (logs or {}).items()}
                stopping = bool(self.model.stop_training) or epoch + 1 >= state["phase_end"]
                entry = {"epoch": epoch + 1, "phase": phase, **logs,
                         "epoch_s": round(time.perf_counter() - self.t0, 3)}
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
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

        return Impl()


def cosine_lr(lr0: float, i: int, n: int) -> float:
    """Learning rate of epoch ``i`` (0-based) of an ``n``-epoch phase under cosine decay."""
    return float(lr0 * 0.5 * (1 + np.cos(np.pi * min(max(i, 0), n) / n)))


def make_strategy(world_size: int) -> tuple[Any, str]:
    """MultiWorkerMirroredStrategy across workers; inside a lone worker, MirroredStrategy over its
    GPUs, or no strategy on one device: a strategy around a single CPU replica made each training
    step ≈ 2.5× slower here (MobileNetV2 128 px: 12.4 vs 31.4 img/s, MWMS or MirroredStrategy alike)."""
    import tensorflow as tf

    if world_size > 1:
        _per_device_datasets_without_autotune()
        return tf.distribute.MultiWorkerMirroredStrategy(), "MultiWorkerMirroredStrategy"
    if len(tf.config.list_logical_devices("GPU")) > 1:
        _per_device_datasets_without_autotune()
        return tf.distribute.MirroredStrategy(), "MirroredStrategy"
    return tf.distribute.get_strategy(), "default (one device)"


def _per_device_datasets_without_autotune() -> None:
    """A strategy's distributed iterator (a MultiDeviceIterator, whatever the InputOptions) builds
    one small dataset per device with default options, so each gets its own tf.data autotuning
    thread, and with it the teardown stall ``data.no_autotune_options`` explains. TensorFlow has no
    option for those datasets, so this wraps its private builder (once per process) to add ours.
    Without the builder (another TensorFlow version) training still works, with the stall."""
    from tensorflow.python.data.ops import multi_device_iterator_ops as mdi

    build = getattr(mdi, "_create_device_dataset", None)
    if build is None:
        log.warning("tf.data per-device datasets keep autotuning (no _create_device_dataset in this "
                    "TensorFlow): expect a stall of up to 60 s at the end of each training phase")
        return
    if getattr(build, "crackscale_no_autotune", False):
        return

    def without_autotune(*args: Any, **kwargs: Any) -> Any:
        return build(*args, **kwargs).with_options(data.no_autotune_options())

    without_autotune.crackscale_no_autotune = True  # type: ignore[attr-defined]
    mdi._create_device_dataset = without_autotune


def save_weights(weights: list[np.ndarray], path: str) -> None:
    """A model's ``get_weights()`` list as .npz (order = the model's weight order)."""
    np.savez(path, *weights)


def load_weights(path: str) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _fit_phase(mdl: Any, base: Any, cfg: TrainConfig, phase: str, state: dict[str, Any],
               train_ds: Any, val_ds: Any, n_train: int, n_val: int, rank: int, tb_dir: str) -> None:
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
    es = _ResumableEarlyStopping(state.get("es"), monitor="val_loss", patience=cfg.patience,
                                 restore_best_weights=True,
                                 start_from_epoch=state["phase_start"] + cfg.min_epochs)
    # identical callbacks on every worker (Keras/MWMS practice): non-chief TensorBoard writes to
    # a throwaway local dir; diverging callback lists can desynchronise collectives
    callbacks = [es, k.callbacks.TensorBoard(log_dir=tb_dir), _Reporter(state, phase, es, rank)]
    if cfg.lr_schedule == "cosine":  # keyed on the absolute epoch: a resumed run continues the curve
        lr0, start = (cfg.head_lr if phase == "head" else cfg.fine_tune_lr), state["phase_start"]
        callbacks.insert(0, k.callbacks.LearningRateScheduler(
            lambda epoch, _lr: cosine_lr(lr0, epoch - start, epochs)))
    log.info("phase %s: epochs %d..%d", phase, state["epoch"] + 1, state["phase_end"])
    mdl.fit(train_ds, epochs=state["phase_end"], initial_epoch=state["epoch"],
            steps_per_epoch=data.steps(n_train, cfg.batch_size), validation_data=val_ds,
            validation_steps=data.steps(n_val, cfg.batch_size), callbacks=callbacks, verbose=2)


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
    autotune = not _multi_device(strategy)
    splits = ray.get(config["data"])
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = splits["train"], splits["val"], splits["test"]

    state: dict[str, Any] = {"phase": "head", "epoch": 0, "history": [], "es": None}
    # a Tune trial restored by PBT (exploit) or --resume starts a fresh Train run from this checkpoint
    ckpt = ray.train.get_checkpoint() or config.get("initial_checkpoint")
    with strategy.scope():
        mdl, base = M.build(cfg)
        if ckpt:
            with ckpt.as_directory() as d:
                state = json.loads(Path(d, STATE_FILE).read_text())
                mdl.set_weights(load_weights(os.path.join(d, WEIGHTS_FILE)))
            state.setdefault("resumed_at_epochs", []).append(state["epoch"])
            log.info("resumed at epoch %d (phase %s)", state["epoch"], state["phase"])

    tb_dir = tempfile.mkdtemp(prefix="crackscale-tb-")
    # Every worker runs the same evaluations: MWMS needs identical op/variable-creation order on
    # all workers (a chief-only predict desynchronises collectives). Only rank 0 keeps results.
    before: dict[str, Any] = state.get("before") or {}
    if not before:
        before = {"val": _evaluate(mdl, va_x, va_y, cfg, 0.5, autotune)[0],
                  "test": _evaluate(mdl, te_x, te_y, cfg, 0.5, autotune)[0]}
        state["before"] = before

    train_ds = _distributed(strategy, tr_x, tr_y, cfg, training=True)
    val_ds = _distributed(strategy, va_x, va_y, cfg, training=False)
    with strategy.scope():
        for phase in ("head", "fine_tune"):
            if state["phase"] == phase:
                _fit_phase(mdl, base, cfg, phase, state, train_ds, val_ds, len(tr_x), len(va_x),
                           rank, tb_dir)

    final: dict[str, Any] = {"epochs_run": state["epoch"]}
    val_m, _ = _evaluate(mdl, va_x, va_y, cfg, autotune=autotune)
    test_m, test_p = _evaluate(mdl, te_x, te_y, cfg, val_m["threshold"], autotune)
    weights = mdl.get_weights()  # on every rank (a collective under MWMS)
    if rank == 0:
        after = {"val": val_m, "test": test_m}
        meta = {
            "name": config["name"],
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "class_names": list(cfg.class_names),
            "crack_class": cfg.crack_class,
            "image_size": cfg.image_size,
            "input": {"dtype": "float32", "shape": [None, cfg.image_size, cfg.image_size, 3],
                      "range": [0, 255], "channels": "RGB"},
            "resize_antialias": cfg.resize_antialias,
            "preprocessing": ("decode JPEG/PNG to RGB, resize to image_size x image_size "
                              f"(bilinear, antialias={cfg.resize_antialias}), float32 0..255; the model applies "
                              "MobileNetV2 scaling (x/127.5 - 1) itself"),
            "output": "sigmoid probability of crack_class, shape [N, 1]",
            "threshold": val_m["threshold"],
            "target_recall": cfg.target_recall,
            "metrics": {"before": before, "after": after},
            "config": to_dict(cfg),
            "manifest_hash": config["manifest_hash"],
            "data_stats": config["data_stats"],
            "versions": artifact.versions(),
            "history": state["history"],
            "resumed_at_epochs": state.get("resumed_at_epochs", []),
            "num_workers": ctx.get_world_size(),
            "num_replicas": strategy.num_replicas_in_sync,
            "strategy": strategy_name,
        }
        plain, _ = M.build(cfg, load_weights=False)
        plain.set_weights(weights)
        extra = tempfile.mkdtemp(prefix="crackscale-extra-")
        Path(extra, "config.yaml").write_text(dump(cfg))
        Path(extra, "manifest.csv").write_text(config["manifest_csv"])
        # per-image test scores: reports (ROC/PR curves, misclassified grid) need nothing else
        rows = ["uri,label,probability"] + [
            f"{json.dumps(u)},{y},{float(p)!r}" for u, y, p in zip(config["test_uris"], te_y, test_p)]
        Path(extra, "test_predictions.csv").write_text("\n".join(rows) + "\n")
        if Path(tb_dir).is_dir():
            import shutil

            shutil.copytree(tb_dir, Path(extra, "tensorboard"))
        # the LiteRT export's parity check runs on real validation images, decoded as for training
        check = next(iter(data.tf_dataset(va_x[:64], va_y[:64], cfg.image_size, 64, shuffle=False,
                                          seed=0, repeat=False, antialias=cfg.resize_antialias)))[0].numpy()
        artifact.save(plain, meta, config["output"], extra_dir=extra, cfg=cfg.storage, check_images=check)
        final.update({f"test_{k_}": v for k_, v in test_m.items() if isinstance(v, (int, float))})
        final.update({f"val_{k_}": v for k_, v in val_m.items() if isinstance(v, (int, float))})
        final["artifact"] = config["output"]
    ray.train.report(final, checkpoint=None)


# ---- driver side ------------------------------------------------------------------------------

def resolve_data(cfg: TrainConfig) -> str:
    """The data URI; with ``data: ""`` synthetic demo images are generated first."""
    if cfg.data:
        return cfg.data
    from crackscale import synth

    return str(synth.generate(cfg.synth_dir, per_class=cfg.synth_per_class, seed=cfg.seed,
                              class_names=tuple(cfg.class_names)))  # type: ignore[arg-type]


def auto_workers(cfg: TrainConfig) -> tuple[int, int]:
    """(num_workers, gpus_per_worker): ``num_workers: 0`` means one worker per GPU node."""
    import ray

    gpu_nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]
    if cfg.use_gpu and not gpu_nodes:
        # an autoscaling cluster may add GPU nodes later; a fixed one never will
        log.warning("use_gpu: true but the cluster has no GPU node yet; waiting for the autoscaler")
    if cfg.num_workers > 0:
        return cfg.num_workers, cfg.gpus_per_worker
    if not cfg.use_gpu or not gpu_nodes:
        return 1, cfg.gpus_per_worker
    return len(gpu_nodes), int(min(n["Resources"]["GPU"] for n in gpu_nodes))


def run_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage_path, cfg.name)


def latest_run(storage_path: str) -> str:
    runs = sorted(p for p in Path(storage_path).glob("train-*") if (p / "crackscale").is_dir())
    if not runs:
        raise ConfigError(f"--resume: no previous run under storage_path {storage_path}; set name=")
    return runs[-1].name


def _storage_args(cfg: TrainConfig) -> dict[str, Any]:
    if storage.is_s3(cfg.storage_path):
        return {"storage_path": cfg.storage_path[len("s3://"):],
                "storage_filesystem": storage.s3_filesystem(cfg.storage)}
    return {"storage_path": str(Path(cfg.storage_path).expanduser().absolute())}


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    def fix(v: str) -> str:
        return v if (not v or storage.is_s3(v) or v.lower() in ("none", "imagenet")) else str(Path(v).expanduser().absolute())

    return from_dict(TrainConfig, {**to_dict(cfg), "data": fix(cfg.data), "output": fix(cfg.output),
                                   "storage_path": fix(cfg.storage_path), "synth_dir": fix(cfg.synth_dir),
                                   "weights": fix(cfg.weights)})


def make_trainer(cfg: TrainConfig, loop_config: dict[str, Any], run_config: Any = None) -> Any:
    """The Ray Train trainer for ``cfg`` (shared by ``run`` and the Tune driver function): a
    ``DataParallelTrainer`` with the MWMS backend of ``crackscale.tf_backend`` (what
    ``TensorflowTrainer`` does, without importing TensorFlow in the driver and the controller)."""
    from ray.train import ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from crackscale.tf_backend import MWMSConfig

    workers, gpus = auto_workers(cfg)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = gpus
    return DataParallelTrainer(
        train_loop_per_worker, train_loop_config=loop_config, run_config=run_config,
        backend_config=MWMSConfig(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
    )


def prepare(cfg: TrainConfig, prepared: data.Prepared | None = None) -> dict[str, Any]:
    """The worker config for ``cfg``: image bytes go to Ray's object store, read once here."""
    import ray

    data_uri = resolve_data(cfg)
    if prepared is None:
        prepared = data.scan(cfg, data_uri)
    ref = ray.put({s: (prepared.images[s], prepared.labels[s]) for s in data.SPLITS})
    return {
        "cfg": to_dict(cfg), "data": ref, "name": cfg.name,
        "output": cfg.output or storage.join(run_dir(cfg), "model"),
        "manifest_hash": prepared.manifest_hash, "manifest_csv": data.manifest_csv(prepared.manifest),
        "data_stats": prepared.stats, "data_uri": data_uri,
        "test_uris": [r["uri"] for r in prepared.manifest if r["split"] == "test"],
    }


def run(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` on the connected Ray cluster; returns a JSON-able summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    t0 = time.time()
    if resume and not cfg.name:
        if storage.is_s3(cfg.storage_path):
            raise ConfigError("--resume with an s3:// storage_path needs the run name: --set name=...")
        cfg = from_dict(TrainConfig, {**to_dict(cfg), "name": latest_run(cfg.storage_path)})
    if not cfg.name:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg = from_dict(TrainConfig, {**to_dict(cfg), "name": f"train-{stamp}"})
    cfg = absolute_paths(cfg)
    meta_dir = storage.join(run_dir(cfg), "crackscale")
    storage.check_bucket(cfg.storage_path, cfg.storage)
    exists = storage.exists(storage.join(meta_dir, "config.yaml"), cfg.storage)
    if exists and not resume:
        raise ConfigError(f"run '{cfg.name}' already exists in {cfg.storage_path}: "
                          "pass --resume to continue it or choose another name")
    if resume and not exists:
        raise ConfigError(f"--resume: no run named '{cfg.name}' in {cfg.storage_path}")
    prepared = data.scan(cfg, resolve_data(cfg))  # before Ray starts: bad data fails fast
    if not ray.is_initialized():
        ray.init()
    loop_config = prepare(cfg, prepared)
    hash_uri = storage.join(meta_dir, "manifest_hash.txt")
    if resume and storage.read_text(hash_uri, cfg.storage).strip() != loop_config["manifest_hash"]:
        raise ConfigError(f"--resume: the data under {loop_config['data_uri']} changed since run "
                          f"'{cfg.name}' started (manifest hash differs); start a new run")
    storage.write_text(storage.join(meta_dir, "config.yaml"), dump(cfg), cfg.storage)
    storage.write_text(hash_uri, loop_config["manifest_hash"], cfg.storage)
    storage.write_text(storage.join(meta_dir, "manifest.csv"), loop_config["manifest_csv"], cfg.storage)

    run_config = RunConfig(
        name=cfg.name, **_storage_args(cfg),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    result = make_trainer(cfg, loop_config, run_config).fit()
    if result.error:
        raise result.error
    meta = artifact.read_meta(loop_config["output"], cfg.storage)
    keys = ("accuracy", "precision", "recall", "roc_auc", "threshold", "accuracy_at_0.5", "n")
    summary = {
        "run": cfg.name,
        "artifact": loop_config["output"],
        "epochs_run": len(meta["history"]),
        "resumed_at_epochs": meta.get("resumed_at_epochs", []),
        "data": loop_config["data_stats"],
        "test": {k: meta["metrics"]["after"]["test"].get(k) for k in keys},
        "val": {k: meta["metrics"]["after"]["val"].get(k) for k in keys},
        "test_before": {k: meta["metrics"]["before"]["test"].get(k) for k in keys},
        "duration_s": round(time.time() - t0, 1),
    }
    storage.write_text(storage.join(meta_dir, "summary.json"), json.dumps(summary, indent=2), cfg.storage)
    return summary
