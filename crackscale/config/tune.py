"""``TuneConfig``: a hyperparameter and schedule search over training (``jobs/tune.py``,
``crackscale tune``), and the search specs a trial's keys are drawn from."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from crackscale.config.loader import ConfigError, check, replace, setting
from crackscale.config.train import TrainConfig

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
        check(self.scheduler in ("asha", "pbt"), "config key 'scheduler' must be asha or pbt")
        check(
            self.metric in TUNE_METRICS,
            f"config key 'metric': {self.metric!r} is never reported by "
            f"training; choose one of {', '.join(TUNE_METRICS)}",
        )
        check(self.mode in ("auto", "min", "max"), "config key 'mode' must be auto, min or max")
        check(self.num_samples >= 1, "config key 'num_samples' must be >= 1")
        check(self.max_concurrent >= 0, "config key 'max_concurrent' must be >= 0 (0 = from the cluster)")
        check(self.grace_period >= 1, "config key 'grace_period' must be >= 1")
        check(self.reduction_factor > 1, "config key 'reduction_factor' must be > 1")
        check(self.perturbation_interval >= 1, "config key 'perturbation_interval' must be >= 1")
        check(0 < self.pbt_quantile <= 0.5, "config key 'pbt_quantile' must be in (0, 0.5]")
        check(self.keep_top_k >= 1, "config key 'keep_top_k' must be >= 1")
        if self.scheduler == "asha":
            check(
                bool(self.search_space),
                "config key 'search_space' is empty: list at least one "
                f"key to search, e.g. head_lr: {{loguniform: [1e-4, 1e-2]}} (tunable: {', '.join(TUNABLE_KEYS)})",
            )
        else:
            check(
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
    check(
        key in TUNABLE_KEYS,
        f"config key '{where}': {key!r} cannot be searched (tunable keys: {', '.join(TUNABLE_KEYS)})",
    )
    check(
        isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_SPECS,
        f"config key '{where}' must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
        f"{{randint: [low, high]}} (high excluded) or {{choice: [v1, v2, ...]}}; got {spec!r}",
    )
    kind, args = next(iter(spec.items()))
    check(isinstance(args, list) and len(args) > 0, f"config key '{where}.{kind}' must be a non-empty list")
    if kind == "choice":
        values = args
    else:
        check(
            len(args) == 2
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            and args[0] < args[1],
            f"config key '{where}.{kind}' must be [low, high] numbers with low < high",
        )
        check(kind != "loguniform" or args[0] > 0, f"config key '{where}.loguniform' needs low > 0")
        check(
            kind != "randint" or all(isinstance(a, int) for a in args),
            f"config key '{where}.randint' needs integer bounds",
        )
        values = [args[0], args[1] - 1] if kind == "randint" else [args[0], args[1]]
    field_tp = typing.get_type_hints(TrainConfig)[key]
    check(
        kind not in ("uniform", "loguniform") or field_tp is float,
        f"config key '{where}': {key} is not a real number; use randint or choice",
    )
    for v in values:
        try:
            replace(base, **{key: v})
        except ConfigError as e:
            raise ConfigError(f"config key '{where}': value {v!r} is invalid: {e}") from None
