"""Typed, strict job configs: YAML file + ``--set key=value`` overrides.

Unknown keys and wrong types are errors that name the key. Nothing is read from the environment
here; defaults are plain data. Every key carries a one-line help text (``setting``); the reference
page docs/configuration.md is generated from them (``make docs``, crackscale.config_docs).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def setting(
    default: Any = dataclasses.MISSING, *, help: str, group: str = "", factory: Callable[[], Any] | None = None
) -> Any:
    """A config key: its default (or ``factory`` for mutable defaults), one-line ``help`` and the
    ``group`` it is listed under in docs/configuration.md (both in the field's metadata)."""
    metadata = {"help": help, "group": group}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Where S3-compatible storage lives. Empty values fall back to the standard AWS variables.

    Keys: docs/configuration.md, "StorageConfig".
    """

    s3_endpoint: str = setting(
        "",
        help=(
            'S3-compatible endpoint URL, e.g. http://127.0.0.1:9000 for MinIO or Ceph; "" = AWS_ENDPOINT_URL_S3 or '
            "AWS_ENDPOINT_URL, else AWS itself. Credentials come from the standard AWS chain, never from configs"
        ),
    )
    s3_region: str = setting("", help='S3 region; "" = AWS_REGION or AWS_DEFAULT_REGION, else us-east-1')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Keys: docs/configuration.md, "TrainConfig"."""

    data: str = setting(
        "",
        group="Data",
        help=(
            "Labelled image tree <data>/<class>/<files>, a local path or s3://bucket/prefix; "
            '"" = generate synthetic demo images into synth_dir'
        ),
    )
    class_names: tuple[str, ...] = setting(
        ("Negative", "Positive"), group="Data", help="The two class folders under data (exactly two)"
    )
    crack_class: str = setting(
        "Positive",
        group="Data",
        help="Which of class_names is the crack class: the model outputs the probability of this class",
    )
    extensions: tuple[str, ...] = setting(
        (".jpg", ".jpeg", ".png"), group="Data", help="File suffixes listed as images under data (case-insensitive)"
    )
    group_pattern: str = setting(
        r"(\d+)",
        group="Data",
        help=(
            "Regular expression on the file name whose group 1 is the source-photo key; "
            "files with the same key always land in the same split"
        ),
    )
    group_size: int = setting(
        50,
        group="Data",
        help=(
            "Numeric source-photo keys are bucketed by this many (>= 1), so neighbouring crops of one photo "
            "share a split; 1 = every number is its own group"
        ),
    )
    val_fraction: float = setting(
        0.2,
        group="Data",
        help=(
            "Share of each class's groups held out for validation (early stopping, decision threshold), between 0 and 1"
        ),
    )
    test_fraction: float = setting(
        0.1,
        group="Data",
        help=(
            "Share of each class's groups held out for the final test metrics, in [0, 1); "
            "val_fraction + test_fraction must stay below 1"
        ),
    )
    limit_per_class: int = setting(
        0, group="Data", help="0 = use every image; N > 0 keeps only the first N files of each class, for quick runs"
    )
    seed: int = setting(
        42,
        group="Data",
        help=(
            "Seed of the split order, the shuffling and the synthetic demo images; another seed gives another "
            "grouped split"
        ),
    )
    synth_per_class: int = setting(200, group="Data", help='Synthetic images generated per class when data is ""')
    synth_dir: str = setting("demo/data", group="Data", help='Where synthetic images are written when data is ""')
    image_size: int = setting(
        160,
        group="Model",
        help=(
            "Square model input in pixels (>= 32) that images are resized to; larger is slower and can be more accurate"
        ),
    )
    resize_antialias: bool = setting(
        False,
        group="Model",
        help=(
            "Resize with antialiasing (true) or plain bilinear (false); recorded in model.json so scoring resizes "
            "the same way. true costs more decode CPU in training and in every scoring run"
        ),
    )
    alpha: float = setting(
        1.0,
        group="Model",
        help="MobileNetV2 width multiplier: 0.35, 0.5, 0.75, 1.0, 1.3 or 1.4; smaller is faster and less accurate",
    )
    weights: str = setting(
        "imagenet",
        group="Model",
        help=(
            "Initial base weights: imagenet (downloaded by Keras), none (train from scratch), "
            "or a path or s3:// URI of a MobileNetV2 no-top .h5 file"
        ),
    )
    bn_momentum: float = setting(
        0.0,
        group="Model",
        help="BatchNorm momentum in [0, 1); 0 = auto: 0.999 with pretrained weights, 0.9 from scratch",
    )
    dropout: float = setting(0.3, group="Model", help="Dropout rate before the classifier layer, in [0, 1)")
    flip: bool = setting(True, group="Model", help="Augmentation: random horizontal flips during training")
    rotation: float = setting(
        0.2,
        group="Model",
        help="Augmentation: random rotation during training, up to this fraction of a full turn either way; 0 = off",
    )
    freeze_base: str = setting(
        "auto",
        group="Model",
        help=(
            'Head phase: freeze the base network. auto = only with pretrained weights, or "true" / "false" '
            "(quoted in YAML: the key is a string)"
        ),
    )
    batch_size: int = setting(
        32, group="Schedule", help="Global batch size, split over all replicas whatever their number"
    )
    head_epochs: int = setting(
        10,
        group="Schedule",
        help="Epochs of phase 1, the classifier head (Adam); head_epochs + fine_tune_epochs must be > 0",
    )
    head_lr: float = setting(1e-4, group="Schedule", help="Learning rate of phase 1 (Adam)")
    fine_tune_epochs: int = setting(
        10, group="Schedule", help="Epochs of phase 2, fine-tuning the base (RMSprop); 0 = no fine-tuning"
    )
    fine_tune_lr: float = setting(1e-5, group="Schedule", help="Learning rate of phase 2 (RMSprop)")
    fine_tune_at: int = setting(
        100,
        group="Schedule",
        help="Base layers from this index on are trained in phase 2; lower trains more of the network",
    )
    lr_schedule: str = setting(
        "constant",
        group="Schedule",
        help=(
            "constant, or cosine: each phase's learning rate decays per epoch from its lr along a half cosine "
            "(a resumed run continues the curve)"
        ),
    )
    patience: int = setting(
        3,
        group="Schedule",
        help=(
            "Early stopping per phase: epochs without a better val_loss before the phase stops "
            "(its best weights are restored)"
        ),
    )
    min_epochs: int = setting(
        0,
        group="Schedule",
        help="Per phase, early stopping neither stops nor picks a best epoch before this many epochs; 0 = no minimum",
    )
    target_recall: float = setting(
        0.99,
        group="Schedule",
        help=(
            "The decision threshold is the highest that keeps this recall on validation, in (0, 1]; "
            "raise it where a missed crack costs more than a false alarm"
        ),
    )
    num_workers: int = setting(
        1, group="Cluster", help="Ray Train workers, one per node; 0 = one per GPU node (1 without GPUs)"
    )
    use_gpu: bool = setting(False, group="Cluster", help="Train on GPUs (the cluster needs GPU nodes)")
    gpus_per_worker: int = setting(
        1,
        group="Cluster",
        help="GPUs per worker; set it to the GPUs of a node, as each node runs one worker that uses them all",
    )
    cpus_per_worker: int = setting(1, group="Cluster", help="Ray CPUs reserved per worker")
    max_failures: int = setting(
        2,
        group="Cluster",
        help="Worker failures a run survives, each by restarting the workers from the last checkpoint",
    )
    name: str = setting(
        "",
        group="Outputs",
        help=(
            'Run name; "" = train-<timestamp>. An existing name is an error unless --resume is given, '
            "which continues that run"
        ),
    )
    storage_path: str = setting(
        "runs",
        group="Outputs",
        help=(
            "Ray Train run storage (checkpoints, split manifest, logs); a shared filesystem or s3:// on "
            "multi-node clusters"
        ),
    )
    output: str = setting(
        "", group="Outputs", help='Model artifact URI (local directory or s3://); "" = <storage_path>/<name>/model'
    )
    storage: StorageConfig = setting(
        StorageConfig(), group="Outputs", help="S3 connection settings for data, run storage and the artifact"
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent key."""
        _validate_train(self)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring config. Keys: docs/configuration.md, "ScoreConfig"."""

    model: str = setting(
        "",
        group="Inputs and outputs",
        help="Model artifact URI (local directory or s3://), as written by training or tuning; required",
    )
    input: str = setting(
        "",
        group="Inputs and outputs",
        help=(
            "Images to score: a prefix (local directory or s3://bucket/prefix/) or a manifest "
            "(.txt, .csv or .parquet); required"
        ),
    )
    output: str = setting(
        "",
        group="Inputs and outputs",
        help=(
            "Parquet output root (local directory or s3://bucket/prefix/); required. "
            "Images this model already scored there are skipped"
        ),
    )
    extensions: tuple[str, ...] = setting(
        (".jpg", ".jpeg", ".png"),
        group="Inputs and outputs",
        help="Listed files kept, by suffix (case-insensitive); manifest entries are not filtered",
    )
    runtime: str = setting(
        "auto",
        group="Model runtime",
        help=(
            "auto = tf.keras on GPU, on CPU LiteRT if its parity check passes, else tf.keras; "
            "litert = LiteRT, failing if the parity check fails; tf = tf.keras always"
        ),
    )
    parity_tolerance: float = setting(
        1e-4,
        group="Model runtime",
        help="Largest |Δp| between LiteRT and tf.keras on sample images for LiteRT to be used (> 0)",
    )
    batch_size: int = setting(
        0,
        group="Model runtime",
        help=(
            "Images per model call; 0 = per runtime: 4 with LiteRT (small batches stay in CPU caches), 64 with tf.keras"
        ),
    )
    block_size: int = setting(
        256,
        group="Pipeline",
        help="Images per Ray Data batch: one model-actor call (and one decode-task call with decode: tasks) each",
    )
    chunk_size: int = setting(
        2000,
        group="Pipeline",
        help="Images per committed Parquet file: the unit of the exactly-once commit and of re-work after a failure",
    )
    num_actors: int = setting(
        0,
        group="Pipeline",
        help=(
            "Model actors; 0 = one per GPU with use_gpu, on CPU one per actor_cpus CPUs with decode: actor, "
            "else one per CPU node"
        ),
    )
    use_gpu: bool = setting(
        False, group="Pipeline", help="Score on GPUs: one actor per GPU, tf.keras with memory growth"
    )
    actor_cpus: float = setting(
        1.0,
        group="Pipeline",
        help=(
            "Ray CPUs reserved per model actor; with decode: tasks keep it different from decode_cpus, "
            "or Ray fuses the decode tasks into the actors"
        ),
    )
    threads: int = setting(
        0,
        group="Pipeline",
        help=(
            "Inference threads per actor; 0 = the cluster's CPUs divided by the actors with decode: actor on CPU, "
            "else all cores of the actor's node"
        ),
    )
    decode_cpus: float = setting(
        0.5,
        group="Pipeline",
        help="Ray CPUs per read+decode task with decode: tasks (> 0; below 1 lets reads and decoding overlap)",
    )
    decode: str = setting(
        "auto",
        group="Pipeline",
        help=(
            "Where images are read and decoded: actor (inside each model actor), tasks (separate Ray tasks "
            "feeding the actors), auto = actor on CPU, tasks with use_gpu"
        ),
    )
    decoder: str = setting(
        "auto",
        group="Pipeline",
        help=(
            "auto = decode JPEGs without TensorFlow (same pixels) where the artifact and the image allow it, "
            "else with TensorFlow; tf = TensorFlow for every image"
        ),
    )
    read_threads: int = setting(
        16,
        group="Pipeline",
        help="Concurrent object reads per decode call on S3 (>= 1); raise it for high-latency endpoints",
    )
    actor_calls: int = setting(
        0,
        group="Pipeline",
        help=(
            "With decode: actor, batches a model actor works on at once; 0 = 2 if any input is on S3 "
            "(reads overlap inference), else 1"
        ),
    )
    list_threads: int = setting(
        16, group="Pipeline", help="Folders of an S3 input prefix listed at the same time (>= 1); 1 = one flat listing"
    )
    first_wave_s: float = setting(
        60.0,
        group="Pipeline",
        help=(
            "Scoring starts when the listing ends or after this many seconds of it, on the chunks listed so far; "
            "0 = at the first chunk"
        ),
    )
    max_attempts: int = setting(
        3,
        group="Limits",
        help="Pipeline attempts per wave (>= 1): after a lost actor or node the uncommitted chunks run again",
    )
    max_pixels: int = setting(
        50_000_000,
        group="Limits",
        help="Images with more pixels are refused before decoding (decompression-bomb guard)",
    )
    run_date: str = setting("", group="Run", help='Output partition date YYYY-MM-DD; "" = today (UTC)')
    cache_dir: str = setting(
        "",
        group="Run",
        help=(
            'Cache of LiteRT exports for artifacts that carry none, keyed by model SHA-256; "" = <tmp>/crackscale-cache'
        ),
    )
    dashboard: bool = setting(
        False,
        group="Run",
        help="Only with RAY_ADDRESS=local, where the job starts its own Ray: start that Ray's dashboard too",
    )
    storage: StorageConfig = setting(
        StorageConfig(), group="Run", help="S3 connection settings for the model, the input and the output"
    )

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
        _check(
            all(e.startswith(".") for e in self.extensions),
            "config key 'extensions' must list suffixes starting with '.', e.g. .jpg",
        )
        _check(
            not self.run_date or bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.run_date)),
            "config key 'run_date' must look like YYYY-MM-DD",
        )


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
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} matches none of {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        item_tp = typing.get_args(tp)[0]
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
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' for {cls.__name__} (known keys: {known})")
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
    _check(
        self.alpha in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
        "config key 'alpha' must be one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4",
    )
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
TUNABLE_KEYS = (
    "head_lr",
    "fine_tune_lr",
    "fine_tune_at",
    "dropout",
    "batch_size",
    "rotation",
    "flip",
    "image_size",
    "alpha",
    "head_epochs",
    "fine_tune_epochs",
    "bn_momentum",
    "min_epochs",
    "patience",
    "freeze_base",
)
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
    """A hyperparameter/schedule search over ``train``. Keys: docs/configuration.md, "TuneConfig"."""

    train: TrainConfig = setting(
        TrainConfig(),
        group="Search",
        help="The base training config (every TrainConfig key); trials override the searched keys",
    )
    search_space: dict[str, Any] = setting(
        factory=_default_space,
        group="Search",
        help="Keys the trials sample: key → one search spec; needed by asha, with pbt the starting values",
    )
    scheduler: str = setting(
        "asha",
        group="Search",
        help=("asha = stop weak trials early; pbt = Population Based Training, mutating pbt_mutations during training"),
    )
    metric: str = setting(
        "val_loss",
        group="Search",
        help=(
            "Metric that ranks trials: val_loss, val_accuracy or val_recall (the final val_recall is at the "
            "decision threshold)"
        ),
    )
    mode: str = setting("auto", group="Search", help="auto = min for a loss, else max; or min, max")
    num_samples: int = setting(
        8, group="Search", help="Trials (>= 1); the first runs the train section unchanged, as the baseline"
    )
    max_concurrent: int = setting(
        0,
        group="Search",
        help=(
            "Trials at once; 0 = as many as the cluster's CPUs (GPUs) fit, each trial needing "
            "num_workers × cpus_per_worker (× gpus_per_worker)"
        ),
    )
    grace_period: int = setting(
        2, group="ASHA scheduler", help="Epochs every trial runs before it can be stopped (>= 1)"
    )
    reduction_factor: float = setting(
        2.0, group="ASHA scheduler", help="At each rung only the best 1/reduction_factor of the trials go on (> 1)"
    )
    perturbation_interval: int = setting(2, group="PBT scheduler", help="Epochs between exploit/explore steps (>= 1)")
    pbt_mutations: dict[str, Any] = setting(
        factory=_default_mutations,
        group="PBT scheduler",
        help=(
            "Keys mutated during training: key → one search spec; a weak trial copies a strong trial's weights "
            "and perturbs or resamples these"
        ),
    )
    pbt_quantile: float = setting(
        0.25,
        group="PBT scheduler",
        help="At each step the bottom fraction of the trials copies the top fraction, in (0, 0.5]",
    )
    pbt_synch: bool = setting(
        False,
        group="PBT scheduler",
        help="Wait for the whole population at each perturbation; needs every trial running at once",
    )
    keep_top_k: int = setting(
        3, group="Outputs", help="Checkpoints and trial models are kept for the k best trials only (>= 1)"
    )
    name: str = setting(
        "",
        group="Outputs",
        help=(
            'Experiment name; "" = tune-<timestamp>. With --resume, the experiment to continue (default: the latest)'
        ),
    )
    storage_path: str = setting(
        "runs", group="Outputs", help="Tune and Train storage; a shared filesystem or s3:// on multi-node clusters"
    )
    output: str = setting(
        "",
        group="Outputs",
        help='Best model artifact URI (local directory or s3://); "" = <storage_path>/<name>/best-model',
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        _check(self.scheduler in ("asha", "pbt"), "config key 'scheduler' must be asha or pbt")
        _check(
            self.metric in TUNE_METRICS,
            f"config key 'metric': {self.metric!r} is never reported by "
            f"training; choose one of {', '.join(TUNE_METRICS)}",
        )
        _check(self.mode in ("auto", "min", "max"), "config key 'mode' must be auto, min or max")
        _check(self.num_samples >= 1, "config key 'num_samples' must be >= 1")
        _check(self.max_concurrent >= 0, "config key 'max_concurrent' must be >= 0 (0 = from the cluster)")
        _check(self.grace_period >= 1, "config key 'grace_period' must be >= 1")
        _check(self.reduction_factor > 1, "config key 'reduction_factor' must be > 1")
        _check(self.perturbation_interval >= 1, "config key 'perturbation_interval' must be >= 1")
        _check(0 < self.pbt_quantile <= 0.5, "config key 'pbt_quantile' must be in (0, 0.5]")
        _check(self.keep_top_k >= 1, "config key 'keep_top_k' must be >= 1")
        if self.scheduler == "asha":
            _check(
                bool(self.search_space),
                "config key 'search_space' is empty: list at least one "
                f"key to search, e.g. head_lr: {{loguniform: [1e-4, 1e-2]}} (tunable: {', '.join(TUNABLE_KEYS)})",
            )
        else:
            _check(
                bool(self.pbt_mutations),
                "config key 'pbt_mutations' is empty: PBT needs at least "
                "one key to mutate, e.g. head_lr: {loguniform: [1e-4, 1e-2]}",
            )
        for section in ("search_space", "pbt_mutations"):
            for key, spec in getattr(self, section).items():
                _validate_spec(self.train, f"{section}.{key}", key, spec)

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric.endswith("loss") else "max"


def _validate_spec(base: TrainConfig, where: str, key: str, spec: Any) -> None:
    """A search spec is ``{kind: args}``; every value it can produce must make a valid TrainConfig."""
    _check(
        key in TUNABLE_KEYS,
        f"config key '{where}': {key!r} cannot be searched (tunable keys: {', '.join(TUNABLE_KEYS)})",
    )
    _check(
        isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_SPECS,
        f"config key '{where}' must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
        f"{{randint: [low, high]}} (high excluded) or {{choice: [v1, v2, ...]}}; got {spec!r}",
    )
    kind, args = next(iter(spec.items()))
    _check(isinstance(args, list) and len(args) > 0, f"config key '{where}.{kind}' must be a non-empty list")
    if kind == "choice":
        values = args
    else:
        _check(
            len(args) == 2
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            and args[0] < args[1],
            f"config key '{where}.{kind}' must be [low, high] numbers with low < high",
        )
        _check(kind != "loguniform" or args[0] > 0, f"config key '{where}.loguniform' needs low > 0")
        _check(
            kind != "randint" or all(isinstance(a, int) for a in args),
            f"config key '{where}.randint' needs integer bounds",
        )
        values = [args[0], args[1] - 1] if kind == "randint" else [args[0], args[1]]
    field_tp = typing.get_type_hints(TrainConfig)[key]
    _check(
        kind not in ("uniform", "loguniform") or field_tp is float,
        f"config key '{where}': {key} is not a real number; use randint or choice",
    )
    for v in values:
        try:
            replace(base, **{key: v})
        except ConfigError as e:
            raise ConfigError(f"config key '{where}': value {v!r} is invalid: {e}") from None
