"""The search: Tune domains from the config's specs, the most epochs a trial can run, and how many
trials the cluster fits at once."""

from __future__ import annotations

import logging
from typing import Any

from crackscale.config.loader import ConfigError
from crackscale.config.train import TrainConfig
from crackscale.config.tune import TuneConfig
from crackscale.training.driver import auto_workers

log = logging.getLogger(__name__)


def domain(spec: dict[str, Any]) -> Any:
    from ray import tune

    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(list(args))
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*args)


def param_space(cfg: TuneConfig) -> dict[str, Any]:
    """Tune domains for ``search_space`` (plus the PBT-mutated keys, sampled initially)."""
    space = {k: domain(v) for k, v in cfg.search_space.items()}
    if cfg.scheduler == "pbt":
        space.update({k: domain(v) for k, v in cfg.pbt_mutations.items() if k not in space})
    return space


def max_epochs(cfg: TuneConfig) -> int:
    """The most epochs any trial can run (ASHA's max_t)."""
    total = 0
    for key in ("head_epochs", "fine_tune_epochs"):
        spec = cfg.search_space.get(key)
        if not spec:
            total += getattr(cfg.train, key)
        elif "choice" in spec:
            total += max(spec["choice"])
        else:
            total += spec["randint"][1] - 1
    return max(total, 1)


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """Cluster resources one trial's Train workers take (the trial's driver function takes none)."""
    workers, gpus = auto_workers(cfg)
    need = {"CPU": float(workers * cfg.cpus_per_worker)}
    if cfg.use_gpu:
        need["GPU"] = float(workers * gpus)
    return need


def concurrency(cfg: TuneConfig) -> int:
    """Trials that run at once: what the cluster fits (capped by ``max_concurrent``, ``num_samples``)."""
    import ray

    need = trial_resources(cfg.train)
    workers, gpus = auto_workers(cfg.train)
    per_worker = {"CPU": float(cfg.train.cpus_per_worker)}
    if cfg.train.use_gpu:
        per_worker["GPU"] = float(gpus)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    have = ", ".join(f"{k} {total.get(k, 0):g}" for k in need)
    shape = f"train.num_workers={workers} x {per_worker}"
    if not any(all(node.get(k, 0) >= v for k, v in per_worker.items()) for node in nodes):
        raise ConfigError(
            f"no node of the cluster can hold one training worker ({shape}); the biggest "
            f"node has {max((n.get('CPU', 0) for n in nodes), default=0):g} CPU, "
            f"{max((n.get('GPU', 0) for n in nodes), default=0):g} GPU: "
            "lower train.cpus_per_worker / train.gpus_per_worker"
        )
    fits = min(int(total.get(k, 0) // v) for k, v in need.items() if v > 0)
    if fits < 1:
        raise ConfigError(
            f"one trial needs {need} ({shape}) but the cluster has only {have}: "
            "lower train.num_workers / train.cpus_per_worker or add nodes"
        )
    n = min(fits, cfg.num_samples)
    if cfg.max_concurrent:
        if cfg.max_concurrent > fits:
            log.warning(
                "max_concurrent=%d but the cluster fits %d trials at once: using %d", cfg.max_concurrent, fits, fits
            )
        n = min(n, cfg.max_concurrent)
    return n
