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
    patience: int = 3  # EarlyStopping on val_loss, per phase
    target_recall: float = 0.99  # decision threshold chosen on validation for this recall
    # cluster
    num_workers: int = 1  # Ray Train workers: one per node
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
    """Batch scoring config (see crackscale.score)."""

    model: str = ""  # model artifact URI
    input: str = ""  # image prefix (local or s3://) or a manifest file (.txt/.csv/.parquet)
    output: str = ""  # Parquet output root (local or s3://)
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    runtime: str = "auto"  # auto | litert | tf
    batch_size: int = 64
    num_actors: int = 0  # 0 = one per GPU, or per spare CPU slot
    use_gpu: bool = False
    decode_cpus: float = 1.0
    storage: StorageConfig = StorageConfig()


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
    # YAML scalars so that --set epochs=3 is an int and --set weights=none stays a string.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    return key.split("."), value


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
    _check(self.num_workers >= 1, "config key 'num_workers' must be >= 1")
    _check(self.freeze_base in ("auto", "true", "false"), "config key 'freeze_base' must be auto, true or false")
    _check(self.group_size >= 1, "config key 'group_size' must be >= 1")
    _check(0 <= self.bn_momentum < 1, "config key 'bn_momentum' must be in [0, 1)")
    _check(bool(self.weights), "config key 'weights' must be imagenet, none, or a path/URI")

