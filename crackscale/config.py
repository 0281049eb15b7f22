"""Typed, strict job configs: YAML file + ``--set key=value`` overrides.

Unknown keys and wrong types are errors that name the key. Nothing is read from the environment
here; defaults are plain data.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Where S3-compatible storage lives. Empty values fall back to the standard AWS variables."""

    s3_endpoint: str = ""  # e.g. http://127.0.0.1:9000 (MinIO/Ceph); "" → AWS_ENDPOINT_URL or AWS
    s3_region: str = ""  # "" → AWS_REGION / AWS_DEFAULT_REGION or us-east-1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. See README "Training config" for each key."""

    # data
    data: str = ""  # labelled image tree (local path or s3://bucket/prefix); "" → synthetic demo data
    class_names: tuple[str, ...] = ("Negative", "Positive")
    crack_class: str = "Positive"
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    group_pattern: str = r"(\d+)"  # regex on the file name; group 1 is the source-photo key
    group_size: int = 50  # numeric keys are bucketed by this many (neighbouring crops share a photo)
    val_fraction: float = 0.2
    test_fraction: float = 0.1
    limit_per_class: int = 0  # 0 = all images; >0 keeps the first N per class (quick runs)
    seed: int = 42
    synth_per_class: int = 200  # images per class when data == "" (synthetic demo data)
    synth_dir: str = "demo/data"  # where synthetic demo data is written when data == ""
    # model
    image_size: int = 160
    resize_antialias: bool = False  # antialiased bilinear resize (2x the decode CPU); recorded in model.json
    alpha: float = 1.0
    weights: str = "imagenet"  # imagenet | none | path or s3:// URI of a MobileNetV2 no-top .h5
    bn_momentum: float = 0.0  # 0 = auto: 0.999 with pretrained weights, 0.9 from scratch
    dropout: float = 0.3
    flip: bool = True
    rotation: float = 0.2
    freeze_base: str = "auto"  # head phase: auto (freeze only pretrained) | true | false
    # schedule
    batch_size: int = 32  # global batch size, whatever the number of replicas
    head_epochs: int = 10
    head_lr: float = 1e-4  # Adam
    fine_tune_epochs: int = 10
    fine_tune_lr: float = 1e-5  # RMSprop
    fine_tune_at: int = 100  # base layers from this index on are trained in the fine-tune phase
    lr_schedule: str = "constant"  # constant | cosine (per epoch within each phase, from its lr down)
    patience: int = 3  # EarlyStopping on val_loss, per phase
    min_epochs: int = 0  # per phase, EarlyStopping neither stops nor picks a best epoch before this
    target_recall: float = 0.99  # decision threshold chosen on validation for this recall
    # cluster
    num_workers: int = 1  # Ray Train workers, one per node; 0 = one per GPU node (1 without GPUs)
    use_gpu: bool = False
    gpus_per_worker: int = 1  # all GPUs of a node go to its one worker
    cpus_per_worker: int = 1
    max_failures: int = 2  # worker failures survived by restarting from the last checkpoint
    # outputs
    name: str = ""  # run name; "" → train-<timestamp>. Re-using a name with --resume continues it
    storage_path: str = "runs"  # Ray Train run storage (checkpoints); shared FS or s3:// for multi-node
    output: str = ""  # model artifact URI; "" → <storage_path>/<name>/model
    storage: StorageConfig = StorageConfig()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent key."""
        _validate_train(self)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring config (see crackscale.score and README "Scoring")."""

    model: str = ""  # model artifact URI (local dir or s3://…), as written by training
    input: str = ""  # image prefix (local dir or s3://bucket/prefix/) or a manifest (.txt/.csv/.parquet)
    output: str = ""  # Parquet output root (local dir or s3://bucket/prefix/)
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")  # listed files kept (case-insensitive)
    runtime: str = "auto"  # auto (GPU: tf, CPU: litert if parity holds, else tf) | litert | tf
    parity_tolerance: float = 1e-4  # max |Δp| LiteRT vs tf.keras on sample images, else not used
    batch_size: int = 0  # images per model call; 0 = per runtime: LiteRT 4 (CPU caches), tf.keras 64
    block_size: int = 256  # images per Ray Data batch: one model-actor call (and decode-task call) each
    chunk_size: int = 2000  # images per committed Parquet file (the unit of exactly-once commit)
    num_actors: int = 0  # 0 = one per GPU (use_gpu), per actor_cpus CPUs (decode: actor), per CPU node (tasks)
    use_gpu: bool = False  # one actor per GPU (num_gpus=1), tf.keras with memory growth
    actor_cpus: float = 1.0  # Ray CPUs reserved per model actor (decode: tasks: keep ≠ decode_cpus, or Ray fuses them)
    threads: int = 0  # inference threads per actor; 0 = CPUs / actors (decode: actor), all of its node's (tasks)
    decode_cpus: float = 0.5  # Ray CPUs per read+decode task (single-threaded; 0.5 overlaps I/O and decode)
    decode: str = "auto"  # where images are read + decoded: actor | tasks | auto (actor on CPU, tasks with use_gpu)
    decoder: str = "auto"  # auto: JPEGs without TensorFlow (same pixels; crackscale.jpeg) where proven, else tf | tf
    read_threads: int = 16  # concurrent object reads per decode call (S3 latency, not bandwidth)
    actor_calls: int = 0  # decode: actor: calls at once per model actor; 0 = 2 if any input is on S3, else 1
    list_threads: int = 16  # concurrent folder listings of an S3 input prefix; 1 = one flat listing
    first_wave_s: float = 60.0  # scoring starts at the listing's end or after this many seconds of it
    max_attempts: int = 3  # pipeline attempts: after a lost actor/node the uncommitted chunks run again
    max_pixels: int = 50_000_000  # larger images are refused (decompression-bomb guard)
    run_date: str = ""  # YYYY-MM-DD output partition; "" = today (UTC)
    cache_dir: str = ""  # LiteRT export cache (keyed by model SHA-256); "" = <tmp>/crackscale-cache
    dashboard: bool = False  # with RAY_ADDRESS=local (the job starts its own Ray): start its dashboard too
    storage: StorageConfig = StorageConfig()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key (required keys are checked by run())."""
        import re

        _check(self.runtime in ("auto", "litert", "tf"), "config key 'runtime' must be auto, litert or tf")
        _check(self.decode in ("auto", "tasks", "actor"), "config key 'decode' must be auto, tasks or actor")
        _check(self.decoder in ("auto", "tf"), "config key 'decoder' must be auto or tf")
        _check(self.batch_size >= 0, "config key 'batch_size' must be >= 0 (0 = per runtime)")
        _check(self.block_size > 0, "config key 'block_size' must be positive")
        _check(self.chunk_size > 0, "config key 'chunk_size' must be positive")
        _check(self.num_actors >= 0, "config key 'num_actors' must be >= 0")
        _check(self.actor_cpus >= 0 and self.decode_cpus > 0, "actor_cpus must be >= 0 and decode_cpus > 0")
        _check(self.threads >= 0, "config key 'threads' must be >= 0")
        _check(self.read_threads >= 1, "config key 'read_threads' must be >= 1")
        _check(self.actor_calls >= 0, "config key 'actor_calls' must be >= 0 (0 = by input)")
        _check(self.list_threads >= 1, "config key 'list_threads' must be >= 1")
        _check(self.first_wave_s >= 0, "config key 'first_wave_s' must be >= 0")
        _check(self.max_attempts >= 1, "config key 'max_attempts' must be >= 1")
        _check(self.max_pixels > 0, "config key 'max_pixels' must be positive")
        _check(self.parity_tolerance > 0, "config key 'parity_tolerance' must be positive")
        _check(all(e.startswith(".") for e in self.extensions),
               "config key 'extensions' must list suffixes starting with '.', e.g. .jpg")
        _check(not self.run_date or bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.run_date)),
               "config key 'run_date' must look like YYYY-MM-DD")


T = TypeVar("T")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} matches none of {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[]") for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' for {cls.__name__} (known keys: {known})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    # kept as text: the field's declared type converts it (so crack_class=Yes stays a string)
    return key.split("."), raw.strip()


def load(cls: type[T], path: str | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional) and ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        data = loaded
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def replace(cfg: T, **changes: Any) -> T:
    """A copy of ``cfg`` with ``changes`` applied and validated like a loaded config."""
    data = dataclasses.asdict(cfg)
    data.update(changes)
    return from_dict(type(cfg), data)


def dump(cfg: Any) -> str:
    """The resolved config as YAML (saved next to checkpoints, artifacts and scoring runs)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _validate_train(self: TrainConfig) -> None:
    _check(len(self.class_names) == 2, "config key 'class_names' must list exactly two classes")
    _check(
        self.crack_class in self.class_names,
        f"config key 'crack_class' ({self.crack_class!r}) must be one of class_names {list(self.class_names)}",
    )
    _check(0 < self.val_fraction < 1, "config key 'val_fraction' must be between 0 and 1")
    _check(0 <= self.test_fraction < 1, "config key 'test_fraction' must be between 0 and 1")
    _check(self.val_fraction + self.test_fraction < 1, "val_fraction + test_fraction must be < 1")
    _check(self.image_size >= 32, "config key 'image_size' must be at least 32")
    _check(self.alpha in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4), "config key 'alpha' must be one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4")
    _check(self.batch_size > 0, "config key 'batch_size' must be positive")
    _check(self.head_epochs >= 0 and self.fine_tune_epochs >= 0, "epochs must be >= 0")
    _check(self.head_epochs + self.fine_tune_epochs > 0, "head_epochs + fine_tune_epochs must be > 0")
    _check(0 <= self.dropout < 1, "config key 'dropout' must be in [0, 1)")
    _check(0 < self.target_recall <= 1, "config key 'target_recall' must be in (0, 1]")
    _check(self.num_workers >= 0, "config key 'num_workers' must be >= 0 (0 = one per GPU node)")
    _check(self.lr_schedule in ("constant", "cosine"), "config key 'lr_schedule' must be constant or cosine")
    _check(self.min_epochs >= 0 and self.patience >= 0, "config keys 'min_epochs' and 'patience' must be >= 0")
    _check(self.freeze_base in ("auto", "true", "false"), "config key 'freeze_base' must be auto, true or false")
    _check(self.group_size >= 1, "config key 'group_size' must be >= 1")
    _check(0 <= self.bn_momentum < 1, "config key 'bn_momentum' must be in [0, 1)")
    _check(bool(self.weights), "config key 'weights' must be imagenet, none, or a path/URI")



# ---- tuning ------------------------------------------------------------------------------------

SEARCH_SPECS = ("loguniform", "uniform", "randint", "choice")
# Keys a trial may change: model, augmentation and schedule. Data, split, cluster shape and
# outputs stay those of ``train`` (every trial trains on the same split held once in the object store).
TUNABLE_KEYS = ("head_lr", "fine_tune_lr", "fine_tune_at", "dropout", "batch_size", "rotation",
                "flip", "image_size", "alpha", "head_epochs", "fine_tune_epochs", "bn_momentum",
                "min_epochs", "patience", "freeze_base")
# reported every epoch *and* in the final result (the final val_recall is at the decision threshold)
TUNE_METRICS = ("val_loss", "val_accuracy", "val_recall")


def _default_space() -> dict[str, Any]:
    return {
        "head_lr": {"loguniform": [3e-4, 1e-2]},
        "fine_tune_lr": {"loguniform": [1e-5, 1e-3]},
        "fine_tune_at": {"choice": [60, 100, 130]},
        "dropout": {"uniform": [0.1, 0.5]},
        "batch_size": {"choice": [16, 32, 64]},
        "rotation": {"uniform": [0.0, 0.3]},
    }


def _default_mutations() -> dict[str, Any]:
    return {"head_lr": {"loguniform": [1e-4, 1e-2]}, "fine_tune_lr": {"loguniform": [1e-6, 1e-3]}}


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """A hyperparameter/schedule search over ``train`` (see crackscale.tune and README "Tuning")."""

    train: TrainConfig = TrainConfig()  # base training config; trials override search_space keys
    search_space: dict[str, Any] = dataclasses.field(default_factory=_default_space)  # key → {loguniform|uniform|randint|choice: …}
    scheduler: str = "asha"  # asha (stop weak trials early) | pbt (mutate pbt_mutations during training)
    metric: str = "val_loss"  # val_loss | val_accuracy | val_recall
    mode: str = "auto"  # auto (min for *loss, else max) | min | max
    num_samples: int = 8  # trials
    max_concurrent: int = 0  # 0 = as many trials as the cluster's CPUs/GPUs fit at once
    grace_period: int = 2  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 2  # PBT: epochs between exploit/explore steps
    pbt_mutations: dict[str, Any] = dataclasses.field(default_factory=_default_mutations)  # PBT: keys it mutates
    pbt_quantile: float = 0.25  # PBT: bottom fraction copies the top fraction
    pbt_synch: bool = False  # PBT: wait for the whole population at each perturbation (needs all trials running)
    keep_top_k: int = 3  # checkpoints and trial models kept for the k best trials only
    name: str = ""  # experiment name; "" → tune-<timestamp>. With --resume: continue this experiment
    storage_path: str = "runs"  # Tune + Train storage; shared FS or s3:// for multi-node clusters
    output: str = ""  # best model artifact URI; "" → <storage_path>/<name>/best-model

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        _check(self.scheduler in ("asha", "pbt"), "config key 'scheduler' must be asha or pbt")
        _check(self.metric in TUNE_METRICS, f"config key 'metric': {self.metric!r} is never reported by "
               f"training; choose one of {', '.join(TUNE_METRICS)}")
        _check(self.mode in ("auto", "min", "max"), "config key 'mode' must be auto, min or max")
        _check(self.num_samples >= 1, "config key 'num_samples' must be >= 1")
        _check(self.max_concurrent >= 0, "config key 'max_concurrent' must be >= 0 (0 = from the cluster)")
        _check(self.grace_period >= 1, "config key 'grace_period' must be >= 1")
        _check(self.reduction_factor > 1, "config key 'reduction_factor' must be > 1")
        _check(self.perturbation_interval >= 1, "config key 'perturbation_interval' must be >= 1")
        _check(0 < self.pbt_quantile <= 0.5, "config key 'pbt_quantile' must be in (0, 0.5]")
        _check(self.keep_top_k >= 1, "config key 'keep_top_k' must be >= 1")
        if self.scheduler == "asha":
            _check(bool(self.search_space), "config key 'search_space' is empty: list at least one "
                   f"key to search, e.g. head_lr: {{loguniform: [1e-4, 1e-2]}} (tunable: {', '.join(TUNABLE_KEYS)})")
        else:
            _check(bool(self.pbt_mutations), "config key 'pbt_mutations' is empty: PBT needs at least "
                   "one key to mutate, e.g. head_lr: {loguniform: [1e-4, 1e-2]}")
        for section in ("search_space", "pbt_mutations"):
            for key, spec in getattr(self, section).items():
                _validate_spec(self.train, f"{section}.{key}", key, spec)

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric.endswith("loss") else "max"


def _validate_spec(base: TrainConfig, where: str, key: str, spec: Any) -> None:
    """A search spec is ``{kind: args}``; every value it can produce must make a valid TrainConfig."""
    _check(key in TUNABLE_KEYS, f"config key '{where}': {key!r} cannot be searched "
           f"(tunable keys: {', '.join(TUNABLE_KEYS)})")
    _check(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_SPECS,
           f"config key '{where}' must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
           f"{{randint: [low, high]}} (high excluded) or {{choice: [v1, v2, ...]}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    _check(isinstance(args, list) and len(args) > 0, f"config key '{where}.{kind}' must be a non-empty list")
    if kind == "choice":
        values = args
    else:
        _check(len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
               and args[0] < args[1], f"config key '{where}.{kind}' must be [low, high] numbers with low < high")
        _check(kind != "loguniform" or args[0] > 0, f"config key '{where}.loguniform' needs low > 0")
        _check(kind != "randint" or all(isinstance(a, int) for a in args),
               f"config key '{where}.randint' needs integer bounds")
        values = [args[0], args[1] - 1] if kind == "randint" else [args[0], args[1]]
    field_tp = typing.get_type_hints(TrainConfig)[key]
    _check(kind not in ("uniform", "loguniform") or field_tp is float,
           f"config key '{where}': {key} is not a real number; use randint or choice")
    for v in values:
        try:
            replace(base, **{key: v})
        except ConfigError as e:
            raise ConfigError(f"config key '{where}': value {v!r} is invalid: {e}") from None
