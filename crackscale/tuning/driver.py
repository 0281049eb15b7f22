"""The tuning driver: scan and split the data once and put it in the object store, then a ``Tuner``
over a driver function (Train V2 pattern) in which each trial builds the same Ray Train trainer as
``jobs/train.py`` with its own config. ASHA stops weak trials early; PBT copies strong trials'
weights into weak ones and perturbs ``pbt_mutations`` (learning rates), which makes a learning-rate
schedule. At the end: a results table, the best trial's artifact exported to ``output``, and the
checkpoints and models of all but the ``keep_top_k`` best trials removed."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

from crackscale import raysession, storage
from crackscale.config.loader import ConfigError, dump, replace
from crackscale.config.tune import TuneConfig
from crackscale.data import labelled
from crackscale.training.driver import prepare, resolve_data, storage_args
from crackscale.tuning.results import export_best, pbt_schedule, prune, rank, rows_of, table_text, trial_dirname
from crackscale.tuning.search import concurrency, domain, max_epochs, param_space, trial_resources
from crackscale.tuning.trial import trial

log = logging.getLogger(__name__)

FINISHED = ("TERMINATED", "ERROR")


def _latest(storage_path: str) -> str:
    runs = sorted(p for p in Path(storage_path).glob("tune-*") if (p / "crackscale").is_dir())
    if not runs:
        raise ConfigError(f"--resume: no previous tuning run under storage_path {storage_path}; set name=")
    return runs[-1].name


def _named(cfg: TuneConfig, resume: bool) -> TuneConfig:
    """``cfg`` with its experiment name and output resolved; refuses a clash or a missing run.
    Trials run in working directories of Ray's, so the outputs are resolved here, in the driver."""
    cfg = replace(
        cfg,
        storage_path=raysession.durable(cfg.storage_path, "storage_path"),
        output=raysession.durable(cfg.output, "output"),
    )
    if resume and not cfg.name:
        if storage.is_s3(cfg.storage_path):
            raise ConfigError("--resume with an s3:// storage_path needs the experiment name: --set name=...")
        cfg = replace(cfg, name=_latest(cfg.storage_path))
    if not cfg.name:
        cfg = replace(cfg, name=f"tune-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if not cfg.output:
        cfg = replace(cfg, output=storage.join(cfg.storage_path, cfg.name, "best-model"))
    storage.check_bucket(cfg.storage_path, cfg.train.storage)
    exists = storage.exists(storage.join(cfg.storage_path, cfg.name, "crackscale", "config.yaml"), cfg.train.storage)
    if exists and not resume:
        raise ConfigError(
            f"tuning run '{cfg.name}' already exists in {cfg.storage_path}: "
            "pass --resume to continue it or choose another name"
        )
    if resume and not exists:
        raise ConfigError(f"--resume: no tuning run named '{cfg.name}' in {cfg.storage_path}")
    return cfg


def _scheduler(cfg: TuneConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if cfg.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(max_epochs(cfg) + 1, cfg.grace_period),
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
        )
    return PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=cfg.perturbation_interval,
        hyperparam_mutations={k: domain(v) for k, v in cfg.pbt_mutations.items()},
        quantile_fraction=cfg.pbt_quantile,
        synch=cfg.pbt_synch,
        log_config=True,
    )


def _tuner(cfg: TuneConfig, trainable: Any, store: dict[str, Any], base: Any, concurrent: int, resume: bool) -> Any:
    """A new ``Tuner`` for ``cfg``, or the one of an interrupted run (``resume``)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    if resume:
        path = storage.join(store["storage_path"], cfg.name)
        return tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=store.get("storage_filesystem"),
        )
    space = param_space(cfg)
    # the first trial is the base config as is: the table shows what the search gained over it
    defaults = {k: getattr(base, k) for k in space}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.resolved_mode(),
            scheduler=_scheduler(cfg),
            search_alg=BasicVariantGenerator(points_to_evaluate=[defaults], max_concurrent=concurrent),
            num_samples=cfg.num_samples,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            **store,
            verbose=1,
            # PBT re-registers the checkpoints it saves, so a count limit would delete one that
            # a trial is about to be restored from; old ones are pruned after the run instead
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if cfg.scheduler == "pbt" else 2),
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def _unfinished(rows: list[dict[str, Any]], cfg: TuneConfig, store: dict[str, Any]) -> list[str]:
    """Trials that did not finish (marked in ``rows``), or how many never started.

    After Ctrl-C Tune stops the running trials (in memory they read TERMINATED); the state it
    saved first tells which had not finished, and trials never created are missing from it."""
    from ray import tune

    saved = tune.ExperimentAnalysis(
        storage.join(store["storage_path"], cfg.name), storage_filesystem=store.get("storage_filesystem")
    ).trials
    open_trials = {t.trial_id for t in saved if t.status not in FINISHED}
    for r in rows:
        if r["trial"] in open_trials and r["stop_reason"] != "completed":
            r["stop_reason"] = "unfinished"
    unfinished = [r["trial"] for r in rows if r["stop_reason"] == "unfinished"]
    if not unfinished and len(saved) < cfg.num_samples:
        unfinished = [f"{cfg.num_samples - len(saved)} not started"]
    return unfinished


def _best_section(rows: list[dict[str, Any]], best: dict[str, Any], cfg: TuneConfig, base: Any) -> dict[str, Any]:
    """The "tune" section the best model's model.json gains (with the PBT schedule it followed)."""
    # trial 0 ran the base config (points_to_evaluate); under PBT it may have been mutated since
    default_row = next(
        (
            r
            for r in rows
            if r["trial"].endswith("_00000") and all(getattr(base, k) == v for k, v in r["config"].items())
        ),
        None,
    )
    section = {
        "experiment": cfg.name,
        "trial": best["trial"],
        "metric": cfg.metric,
        "mode": cfg.resolved_mode(),
        "value": best[cfg.metric],
        "config": best["config"],
        "scheduler": cfg.scheduler,
        "trials": len(rows),
        "default_config": {k: default_row[k] for k in ("trial", cfg.metric, "epochs", "stop_reason")}
        if default_row
        else None,
    }
    if cfg.scheduler == "pbt":
        experiment = storage.join(cfg.storage_path, cfg.name)
        glob_uri = storage.join(experiment, "pbt_global.txt")
        exploits = 0
        if storage.exists(glob_uri, cfg.train.storage):
            exploits = len(storage.read_text(glob_uri, cfg.train.storage).strip().splitlines())
        # an exploit at the final report restores the last checkpoint and trains nothing more
        schedule = [
            e
            for e in pbt_schedule(experiment, best["trial"], best["config"], list(cfg.pbt_mutations), cfg)
            if e["from_epoch"] <= (best["epochs"] or 0)
        ]
        section["pbt"] = {"exploits": exploits, "schedule": schedule}
    return section


def _results(
    rows: list[dict[str, Any]], cfg: TuneConfig, meta_dir: str, concurrent: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """The run's summary so far, and the results table (JSON and text) written beside its config."""
    text = table_text(rows, cfg.metric)
    log.info("results (%s, %s):\n%s", cfg.metric, cfg.resolved_mode(), text)
    public = [{k: v for k, v in r.items() if k not in ("path", "filesystem")} for r in rows]
    table_json = json.dumps(public, indent=2, default=str)
    storage.write_text(storage.join(meta_dir, "results.json"), table_json, cfg.train.storage)
    storage.write_text(storage.join(meta_dir, "results.txt"), text + "\n", cfg.train.storage)
    summary: dict[str, Any] = {
        "experiment": cfg.name,
        "storage": storage.join(cfg.storage_path, cfg.name),
        "scheduler": cfg.scheduler,
        "metric": cfg.metric,
        "mode": cfg.resolved_mode(),
        "trials": len(rows),
        "max_concurrent": concurrent,
        "completed": sum(r["stop_reason"] == "completed" for r in rows),
        "stopped_early": sum(r["stop_reason"].startswith("stopped early") for r in rows),
        "errored": sum(r["stop_reason"].startswith("error") for r in rows),
        "table": public,
    }
    return summary, {"tune_results.json": table_json, "tune_results.txt": text + "\n"}


def run(cfg: TuneConfig, resume: bool = False) -> dict[str, Any]:
    """Search per ``cfg`` on the connected Ray cluster; export the best model; JSON-able summary."""
    from ray import tune

    t0 = time.time()
    cfg = _named(cfg, resume)
    experiment = storage.join(cfg.storage_path, cfg.name)
    meta_dir = storage.join(experiment, "crackscale")
    base = replace(cfg.train, name=cfg.name)
    if base.ingest != "driver":
        raise ConfigError(
            "tuning trains with ingest: driver (its trials share one copy of the images); set ingest: driver"
        )
    prepared = labelled.scan(base, resolve_data(base))  # before Ray: bad data fails fast
    raysession.connect()
    concurrent = concurrency(cfg)
    loop_base = prepare(base, prepared)  # image bytes put once, shared by every trial
    hash_uri = storage.join(meta_dir, "manifest_hash.txt")
    if resume and storage.read_text(hash_uri, cfg.train.storage).strip() != loop_base["manifest_hash"]:
        raise ConfigError(
            f"--resume: the data under {loop_base['data_uri']} changed since tuning run "
            f"'{cfg.name}' started (manifest hash differs); start a new run"
        )
    storage.write_text(storage.join(meta_dir, "config.yaml"), dump(cfg), cfg.train.storage)
    storage.write_text(hash_uri, loop_base["manifest_hash"], cfg.train.storage)

    trainable = tune.with_resources(
        tune.with_parameters(trial, loop_base=loop_base, meta={"name": cfg.name, "experiment": experiment}),
        # The driver function only waits: its Train workers hold the CPUs/GPUs. Tune refuses an
        # empty request, so the trial reserves one byte of memory instead of a CPU.
        {"CPU": 0, "memory": 1},
    )
    store = storage_args(replace(base, storage_path=cfg.storage_path))
    log.info(
        "tuning %s: %d trials, %s on %s, %d at a time (%s per trial)",
        cfg.name,
        cfg.num_samples,
        cfg.scheduler,
        cfg.metric,
        concurrent,
        trial_resources(cfg.train),
    )
    rows = rows_of(_tuner(cfg, trainable, store, base, concurrent, resume).fit(), cfg)
    unfinished = _unfinished(rows, cfg, store)
    summary, files = _results(rows, cfg, meta_dir, concurrent)
    if unfinished:
        summary.update(
            status="interrupted",
            unfinished=unfinished,
            resume=f"run again with --resume --set name={cfg.name}",
            wall_time_s=round(time.time() - t0, 1),
        )
        return summary
    ranked = rank(rows, cfg)
    if not ranked:
        raise RuntimeError(
            f"no trial of '{cfg.name}' completed with metric {cfg.metric}; see {storage.join(meta_dir, 'results.txt')}"
        )
    best = ranked[0]
    section = _best_section(rows, best, cfg, base)
    output = export_best(best, cfg, section, files)
    pruned = prune(rows, ranked, cfg, experiment)
    summary.update(
        status="done",
        best={"trial": best["trial"], cfg.metric: best[cfg.metric], "config": best["config"], "epochs": best["epochs"]},
        default_config=section["default_config"],
        artifact=output,
        pruned_trials=pruned,
        wall_time_s=round(time.time() - t0, 1),
    )
    if "pbt" in section:
        summary["pbt"] = section["pbt"]
    storage.write_text(
        storage.join(meta_dir, "summary.json"), json.dumps(summary, indent=2, default=str), cfg.train.storage
    )
    return summary
