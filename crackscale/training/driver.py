"""The training driver: scan, de-duplicate and split the data once, hand it to the workers, and run
a ``DataParallelTrainer`` whose backend gives each worker its ``TF_CONFIG``.

``ingest: driver`` scans before Ray starts (bad data fails fast) and puts the image bytes in Ray's
object store (workers on any node get them without shared storage). ``ingest: ray_data`` starts Ray
first: the scan hashes in Ray Data tasks, and the trainer gets Ray Data datasets (``raydata``)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crackscale import artifact, raysession, storage
from crackscale.config.loader import ConfigError, dump, from_dict, to_dict
from crackscale.config.train import SourceConfig, TrainConfig
from crackscale.data import labelled, synth
from crackscale.training.backend import MWMSConfig
from crackscale.training.loop import train_loop_per_worker

log = logging.getLogger(__name__)


def resolve_data(cfg: TrainConfig) -> tuple[SourceConfig, ...]:
    """The training sources; with ``data: ""`` synthetic demo images are generated first."""
    if cfg.data:
        return cfg.data
    classes = tuple(cfg.class_names)
    uri = synth.generate(cfg.synth_dir, per_class=cfg.synth_per_class, seed=cfg.seed, class_names=classes)
    return (SourceConfig(uri=str(uri)),)


def describe(srcs: tuple[SourceConfig, ...]) -> str:
    """The sources' URIs, for messages."""
    return ", ".join(s.uri for s in srcs)


def single_crop_tree(cfg: TrainConfig, srcs: tuple[SourceConfig, ...]) -> str:
    """The URI of ``ingest: ray_data``'s one source; refuses several sources or a photo set."""
    from crackscale.data import sources

    if len(srcs) != 1 or sources.kind(srcs[0], cfg.storage) != sources.CROPS:
        raise ConfigError(
            "ingest: ray_data reads one labelled-crop tree; several sources or a photo set train with ingest: driver"
        )
    return srcs[0].uri


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


def storage_args(cfg: TrainConfig) -> dict[str, Any]:
    if storage.is_s3(cfg.storage_path):
        return {
            "storage_path": cfg.storage_path[len("s3://") :],
            "storage_filesystem": storage.s3_filesystem(cfg.storage),
        }
    return {"storage_path": str(Path(cfg.storage_path).expanduser().absolute())}


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray workers do not share the driver's working directory. Inputs
    resolve against the current directory; outputs where they last (``raysession.durable``)."""

    def fix(v: str) -> str:
        return (
            v
            if (not v or storage.is_s3(v) or v.lower() in ("none", "imagenet"))
            else str(Path(v).expanduser().absolute())
        )

    return from_dict(
        TrainConfig,
        {
            **to_dict(cfg),
            "data": [{**to_dict(s), "uri": fix(s.uri)} for s in cfg.data],
            "output": raysession.durable(cfg.output, "output"),
            "storage_path": raysession.durable(cfg.storage_path, "storage_path"),
            # synthetic demo data is written there: an output unless data names the input
            "synth_dir": fix(cfg.synth_dir) if cfg.data else raysession.durable(cfg.synth_dir, "synth_dir"),
            "weights": fix(cfg.weights),
        },
    )


def make_trainer(
    cfg: TrainConfig, loop_config: dict[str, Any], run_config: Any = None, datasets: dict[str, Any] | None = None
) -> Any:
    """The Ray Train trainer for ``cfg`` (shared by ``run`` and the Tune driver function): a
    ``DataParallelTrainer`` with the MWMS backend of ``training.backend`` (what
    ``TensorflowTrainer`` does, without importing TensorFlow in the driver and the controller)."""
    from ray.train import ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    workers, gpus = auto_workers(cfg)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = gpus
    data: dict[str, Any] = {}
    if datasets:
        from crackscale.training import raydata

        data = {"datasets": datasets, "dataset_config": raydata.dataset_config()}
    return DataParallelTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        run_config=run_config,
        backend_config=MWMSConfig(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        **data,
    )


def prepare(cfg: TrainConfig, prepared: labelled.Prepared | None = None) -> dict[str, Any]:
    """The worker config for ``cfg``: image bytes go to Ray's object store, read once here."""
    import ray

    srcs = resolve_data(cfg)
    if prepared is None:
        prepared = labelled.scan(cfg, srcs)
    ref = ray.put({s: (prepared.images[s], prepared.labels[s], prepared.sources[s]) for s in labelled.SPLITS})
    return {
        "cfg": to_dict(cfg),
        "data": ref,
        "name": cfg.name,
        "output": cfg.output or storage.join(run_dir(cfg), "model"),
        "manifest_hash": prepared.manifest_hash,
        "manifest_csv": labelled.manifest_csv(prepared.manifest),
        "data_stats": prepared.stats,
        "data_uri": describe(srcs),
        "test_uris": [r["uri"] for r in prepared.manifest if r["split"] == "test"],
    }


def prepare_ray_data(cfg: TrainConfig, manifest_uri: str) -> tuple[dict[str, Any], dict[str, Any], Iterator[bytes]]:
    """(worker config, Ray Data datasets, manifest CSV in pieces) for ``ingest: ray_data``: the driver lists
    and splits with small rows only (``data.ingest``); the datasets decode in Ray Data tasks. The
    workers read the manifest from ``manifest_uri``, where ``run`` writes it."""
    from crackscale.data import ingest
    from crackscale.training import inputs, raydata

    data_uri = single_crop_tree(cfg, resolve_data(cfg))
    index = ingest.scan(cfg, data_uri)
    datasets, cached = raydata.datasets(cfg, index)
    tr, va = index.split("train"), index.split("val")
    va_uris, va_y = va["uri"].to_pylist(), va["label"].to_pylist()
    m_uris, m_y = inputs.measured(va_uris, va_y, cfg.seed)
    loop_config = {
        "cfg": to_dict(cfg),
        "ingest": "ray_data",
        "rows": {s: len(index.split(s)) for s in labelled.SPLITS},
        "name": cfg.name,
        "output": cfg.output or storage.join(run_dir(cfg), "model"),
        "manifest_hash": index.manifest_hash,
        "manifest_uri": manifest_uri,
        "data_stats": {**index.stats, "ingest_cached": cached},
        "data_uri": data_uri,
        # the few images the artifact's exports are checked and calibrated on, picked as ingest: driver picks them
        "export_uris": {
            "check": va_uris[:64],
            "representative": inputs.representative(tr["uri"].to_pylist(), tr["label"].to_pylist(), cfg.seed),
            "measured": m_uris,
            "measured_labels": m_y,
        },
    }
    return loop_config, datasets, ingest.manifest_chunks(index.table, index.source)


def run(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` on the connected Ray cluster; returns a JSON-able summary."""
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
        raise ConfigError(
            f"run '{cfg.name}' already exists in {cfg.storage_path}: "
            "pass --resume to continue it or choose another name"
        )
    if resume and not exists:
        raise ConfigError(f"--resume: no run named '{cfg.name}' in {cfg.storage_path}")
    datasets = None
    if cfg.ingest == "ray_data":  # the data is read in Ray Data tasks: Ray first
        raysession.connect()
        loop_config, datasets, manifest = prepare_ray_data(cfg, storage.join(meta_dir, "manifest.csv"))
    else:
        prepared = labelled.scan(cfg, resolve_data(cfg))  # before Ray starts: bad data fails fast
        raysession.connect()
        loop_config = prepare(cfg, prepared)
        manifest = [loop_config["manifest_csv"].encode()]
    hash_uri = storage.join(meta_dir, "manifest_hash.txt")
    if resume and storage.read_text(hash_uri, cfg.storage).strip() != loop_config["manifest_hash"]:
        raise ConfigError(
            f"--resume: the data under {loop_config['data_uri']} changed since run "
            f"'{cfg.name}' started (manifest hash differs); start a new run"
        )
    storage.write_text(storage.join(meta_dir, "config.yaml"), dump(cfg), cfg.storage)
    storage.write_text(hash_uri, loop_config["manifest_hash"], cfg.storage)
    storage.write_chunks(storage.join(meta_dir, "manifest.csv"), manifest, cfg.storage)

    run_config = RunConfig(
        name=cfg.name,
        **storage_args(cfg),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    result = make_trainer(cfg, loop_config, run_config, datasets).fit()
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
