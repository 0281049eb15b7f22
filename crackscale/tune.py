"""Hyperparameter and schedule search with Ray Tune; every trial is a ``crackscale.train`` run.

Driver: scan/split the data once and put it in the object store (``train.prepare``), then a
``Tuner`` over a driver function (Train V2 pattern). Each trial builds the same
Ray Train trainer as ``jobs/train.py`` (``train.make_trainer``) with its own config and calls
``fit()``. A Train callback relays each epoch's metrics *and checkpoint* to Tune (Ray's
``TuneReportCallback`` relays metrics only; PBT and ``--resume`` need Tune to hold checkpoints). A
trial that Tune restores (PBT exploit, ``--resume``) starts a fresh Train run from
``tune.get_checkpoint()`` via the loop config's ``initial_checkpoint``.

ASHA stops weak trials early; PBT copies strong trials' weights into weak ones and perturbs
``pbt_mutations`` (learning rates), which makes a learning-rate schedule. At the end: a results
table, the best trial's artifact exported to ``output`` (model.json gains a "tune" section), and
checkpoints/models of all but the ``keep_top_k`` best trials removed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from crackscale import artifact, data, storage, train
from crackscale.config import ConfigError, TrainConfig, TuneConfig, dump, from_dict, replace, to_dict

log = logging.getLogger(__name__)

FINISHED = ("TERMINATED", "ERROR")


# ---- search space and resources ---------------------------------------------------------------

def _domain(spec: dict[str, Any]) -> Any:
    from ray import tune

    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(list(args))
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*args)


def param_space(cfg: TuneConfig) -> dict[str, Any]:
    """Tune domains for ``search_space`` (plus the PBT-mutated keys, sampled initially)."""
    space = {k: _domain(v) for k, v in cfg.search_space.items()}
    if cfg.scheduler == "pbt":
        space.update({k: _domain(v) for k, v in cfg.pbt_mutations.items() if k not in space})
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
    workers, gpus = train.auto_workers(cfg)
    need = {"CPU": float(workers * cfg.cpus_per_worker)}
    if cfg.use_gpu:
        need["GPU"] = float(workers * gpus)
    return need


def concurrency(cfg: TuneConfig) -> int:
    """Trials that run at once: what the cluster fits (capped by ``max_concurrent``, ``num_samples``)."""
    import ray

    need = trial_resources(cfg.train)
    workers, gpus = train.auto_workers(cfg.train)
    per_worker = {"CPU": float(cfg.train.cpus_per_worker)}
    if cfg.train.use_gpu:
        per_worker["GPU"] = float(gpus)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    have = ", ".join(f"{k} {total.get(k, 0):g}" for k in need)
    shape = f"train.num_workers={workers} x {per_worker}"
    if not any(all(node.get(k, 0) >= v for k, v in per_worker.items()) for node in nodes):
        raise ConfigError(f"no node of the cluster can hold one training worker ({shape}); the biggest "
                          f"node has {max((n.get('CPU', 0) for n in nodes), default=0):g} CPU, "
                          f"{max((n.get('GPU', 0) for n in nodes), default=0):g} GPU: "
                          "lower train.cpus_per_worker / train.gpus_per_worker")
    fits = min(int(total.get(k, 0) // v) for k, v in need.items() if v > 0)
    if fits < 1:
        raise ConfigError(f"one trial needs {need} ({shape}) but the cluster has only {have}: "
                          "lower train.num_workers / train.cpus_per_worker or add nodes")
    n = min(fits, cfg.num_samples)
    if cfg.max_concurrent:
        if cfg.max_concurrent > fits:
            log.warning("max_concurrent=%d but the cluster fits %d trials at once: using %d",
                        cfg.max_concurrent, fits, fits)
        n = min(n, cfg.max_concurrent)
    return n


# ---- one trial -------------------------------------------------------------------------------

def _relay_class() -> type:
    from ray.train.v2.api.callback import UserCallback

    class Relay(UserCallback):
        """Runs in the Train controller: hands each rank-0 report and its checkpoint to the trial."""

        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self.queue.put((dict(metrics[0]), checkpoint))

    return Relay


def _trial(config: dict[str, Any], loop_base: dict[str, Any], meta: dict[str, Any]) -> None:
    """Tune driver function: one distributed training run with this trial's config."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.util.queue import Empty, Queue

    base = from_dict(TrainConfig, loop_base["cfg"])
    cfg = replace(base, **config)
    trial_id = ray.tune.get_context().get_trial_id()
    loop = {**loop_base, "cfg": to_dict(cfg), "name": f"{meta['name']}/{trial_id}",
            "output": storage.join(meta["experiment"], "trial-models", trial_id)}
    start = ray.tune.get_checkpoint()  # set when PBT exploited a better trial, or on --resume
    if start is not None:
        loop["initial_checkpoint"] = start
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    runs = replace(base, storage_path=storage.join(meta["experiment"], "train-runs"))
    run_config = RunConfig(name=f"{trial_id}-{uuid.uuid4().hex[:6]}", **train._storage_args(runs),
                           callbacks=[_relay_class()(queue)],
                           failure_config=FailureConfig(max_failures=cfg.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=3))
    trainer = train.make_trainer(cfg, loop, run_config)
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=fit, name="train-fit", daemon=True).start()
    # tune.report must run in this (the trial's) thread; fit() returns only after every callback
    while True:
        finished = done.is_set()
        try:
            metrics, checkpoint = queue.get(timeout=0.5)
        except Empty:
            if finished:
                break
            continue
        if checkpoint is not None:  # Tune copies it into the trial's own storage
            checkpoint = ray.tune.Checkpoint(path=checkpoint.path, filesystem=checkpoint.filesystem)
        ray.tune.report(metrics, checkpoint=checkpoint)
    if "error" in outcome:
        raise outcome["error"]
    if outcome["result"].error:
        raise outcome["result"].error


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


# ---- results --------------------------------------------------------------------------------

def _rows(results: Any, cfg: TuneConfig) -> list[dict[str, Any]]:
    statuses = {t.trial_id: t.status for t in results._experiment_analysis.trials}
    rows = []
    for r in results:
        m = r.metrics or {}
        trial_id = Path(r.path).name  # = trial id (_trial_dirname); PBT copies a donor's metrics
        status = statuses.get(trial_id, "UNKNOWN")
        if r.error is not None:
            lines = str(r.error).strip().splitlines()
            reason = f"error: {lines[-1] if lines else type(r.error).__name__}"
        elif "artifact" in m:
            reason = "completed"
        elif status == "TERMINATED":
            reason = f"stopped early ({cfg.scheduler})"
        else:
            reason = "unfinished"
        rows.append({"trial": trial_id, "config": dict(r.config or {}), cfg.metric: m.get(cfg.metric),
                     "epochs": m.get("epochs_run", m.get("epoch")), "stop_reason": reason,
                     "artifact": m.get("artifact"), "path": r.path, "filesystem": r.filesystem})
    return rows


def _rank(rows: list[dict[str, Any]], cfg: TuneConfig) -> list[dict[str, Any]]:
    done = [r for r in rows if r["stop_reason"] == "completed" and r[cfg.metric] is not None]
    return sorted(done, key=lambda r: r[cfg.metric], reverse=cfg.resolved_mode() == "max")


def table_text(rows: list[dict[str, Any]], metric: str) -> str:
    """The results table as aligned text."""
    head = ["trial", metric, "epochs", "stop_reason", "config"]
    body = [[r["trial"], "-" if r[metric] is None else f"{r[metric]:.4f}", str(r["epochs"] or "-"),
             r["stop_reason"], json.dumps({k: _short(v) for k, v in r["config"].items()})] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def _short(v: Any) -> Any:
    return float(f"{v:.4g}") if isinstance(v, float) else v


def pbt_schedule(experiment: str, trial_id: str, initial: dict[str, Any], keys: list[str],
                 cfg: TuneConfig) -> list[dict[str, Any]]:
    """The mutated keys' values the trial's weights trained with, epoch by epoch range.

    PBT logs each exploit to ``pbt_policy_<trial>.txt`` (the donor's log copied first); walking
    it back from the end follows the chain of weights that ended in this trial (like
    ``PopulationBasedTrainingReplay``).
    """
    uri = storage.join(experiment, f"pbt_policy_{trial_id}.txt")
    rows = []
    if storage.exists(uri, cfg.train.storage):
        rows = [json.loads(line) for line in storage.read_text(uri, cfg.train.storage).splitlines() if line.strip()]
    changes, last_new_tag, first_conf = [], None, initial
    for old_tag, new_tag, _old_step, new_step, old_conf, new_conf in reversed(rows):
        if last_new_tag and old_tag != last_new_tag:
            break
        last_new_tag, first_conf = new_tag, old_conf
        changes.append((new_step, new_conf))
    steps = [(0, first_conf)] + list(reversed(changes))
    return [{"from_epoch": step + 1, **{k: conf.get(k) for k in keys}} for step, conf in steps]


def _remove(uri_or_path: str, fs: Any = None, cfg: TuneConfig | None = None) -> None:
    import pyarrow.fs as pafs

    if fs is None:
        fs, uri_or_path = storage.resolve(uri_or_path, cfg.train.storage if cfg else None)
    if fs.get_file_info(uri_or_path).type == pafs.FileType.Directory:
        fs.delete_dir(uri_or_path)


def _prune(rows: list[dict[str, Any]], ranked: list[dict[str, Any]], cfg: TuneConfig, experiment: str) -> list[str]:
    """Delete checkpoints, Train runs and trial models of all but the top-k trials."""
    import pyarrow.fs as pafs

    keep = {r["trial"] for r in ranked[: cfg.keep_top_k]}
    runs_fs, runs_dir = storage.resolve(storage.join(experiment, "train-runs"), cfg.train.storage)
    try:
        runs = [i.path for i in runs_fs.get_file_info(pafs.FileSelector(runs_dir, allow_not_found=True))]
    except OSError:
        runs = []
    pruned = []
    for r in rows:
        fs = r["filesystem"]
        ckpts = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(r["path"], allow_not_found=True))
                       if i.type == pafs.FileType.Directory and Path(i.path).name.startswith("checkpoint_"))
        for path in ckpts[:-2] if r["trial"] in keep else ckpts:  # the kept trials' latest two stay
            fs.delete_dir(path)
        if r["trial"] in keep:
            continue
        for run_path in runs:
            if Path(run_path).name.startswith(r["trial"] + "-"):
                runs_fs.delete_dir(run_path)
        _remove(storage.join(experiment, "trial-models", r["trial"]), cfg=cfg)
        pruned.append(r["trial"])
    return pruned


def export_best(best: dict[str, Any], cfg: TuneConfig, section: dict[str, Any], extra: dict[str, str]) -> str:
    """Copy the best trial's artifact to ``cfg.output`` with a "tune" section in model.json."""
    import shutil
    import tempfile

    out = cfg.output
    # a copy: download_dir returns local artifacts in place, and the trial's own must stay intact
    with tempfile.TemporaryDirectory(prefix="crackscale-best-") as tmp:
        local = Path(tmp) / "model"
        shutil.copytree(storage.download_dir(best["artifact"], cfg=cfg.train.storage), local)
        meta = json.loads((local / artifact.META_FILE).read_text())
        meta["tune"] = section
        (local / artifact.META_FILE).unlink()
        for name, text in extra.items():
            (local / name).write_text(text)
        storage.upload_dir(local, out, cfg.train.storage)
    # model.json last: an artifact without it is incomplete and refused by artifact.load()
    storage.write_text(storage.join(out, artifact.META_FILE), json.dumps(meta, indent=2, default=str),
                       cfg.train.storage)
    return out


# ---- driver ---------------------------------------------------------------------------------

def _latest(storage_path: str) -> str:
    runs = sorted(p for p in Path(storage_path).glob("tune-*") if (p / "crackscale").is_dir())
    if not runs:
        raise ConfigError(f"--resume: no previous tuning run under storage_path {storage_path}; set name=")
    return runs[-1].name


def run(cfg: TuneConfig, resume: bool = False) -> dict[str, Any]:
    """Search per ``cfg`` on the connected Ray cluster; export the best model; JSON-able summary."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    t0 = time.time()
    if resume and not cfg.name:
        if storage.is_s3(cfg.storage_path):
            raise ConfigError("--resume with an s3:// storage_path needs the experiment name: --set name=...")
        cfg = replace(cfg, name=_latest(cfg.storage_path))
    if not cfg.name:
        cfg = replace(cfg, name=f"tune-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    experiment = storage.join(cfg.storage_path, cfg.name)
    if not cfg.output:
        cfg = replace(cfg, output=storage.join(experiment, "best-model"))
    meta_dir = storage.join(experiment, "crackscale")
    storage.check_bucket(cfg.storage_path, cfg.train.storage)
    exists = storage.exists(storage.join(meta_dir, "config.yaml"), cfg.train.storage)
    if exists and not resume:
        raise ConfigError(f"tuning run '{cfg.name}' already exists in {cfg.storage_path}: "
                          "pass --resume to continue it or choose another name")
    if resume and not exists:
        raise ConfigError(f"--resume: no tuning run named '{cfg.name}' in {cfg.storage_path}")

    base = replace(cfg.train, name=cfg.name)
    prepared = data.scan(base, train.resolve_data(base))  # before Ray: bad data fails fast
    if not ray.is_initialized():
        ray.init()
    concurrent = concurrency(cfg)
    loop_base = train.prepare(base, prepared)  # image bytes put once, shared by every trial
    hash_uri = storage.join(meta_dir, "manifest_hash.txt")
    if resume and storage.read_text(hash_uri, cfg.train.storage).strip() != loop_base["manifest_hash"]:
        raise ConfigError(f"--resume: the data under {loop_base['data_uri']} changed since tuning run "
                          f"'{cfg.name}' started (manifest hash differs); start a new run")
    storage.write_text(storage.join(meta_dir, "config.yaml"), dump(cfg), cfg.train.storage)
    storage.write_text(hash_uri, loop_base["manifest_hash"], cfg.train.storage)

    trainable = tune.with_resources(
        tune.with_parameters(_trial, loop_base=loop_base, meta={"name": cfg.name, "experiment": experiment}),
        # The driver function only waits: its Train workers hold the CPUs/GPUs. Tune refuses an
        # empty request, so the trial reserves one byte of memory instead of a CPU.
        {"CPU": 0, "memory": 1})
    store = train._storage_args(replace(base, storage_path=cfg.storage_path))
    mode = cfg.resolved_mode()
    log.info("tuning %s: %d trials, %s on %s, %d at a time (%s per trial)", cfg.name, cfg.num_samples,
             cfg.scheduler, cfg.metric, concurrent, trial_resources(cfg.train))
    if resume:
        path = storage.join(store["storage_path"], cfg.name)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=store.get("storage_filesystem"))
    else:
        if cfg.scheduler == "asha":
            scheduler: Any = ASHAScheduler(time_attr="training_iteration", max_t=max(max_epochs(cfg) + 1, cfg.grace_period),
                                           grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
        else:
            scheduler = PopulationBasedTraining(
                time_attr="training_iteration", perturbation_interval=cfg.perturbation_interval,
                hyperparam_mutations={k: _domain(v) for k, v in cfg.pbt_mutations.items()},
                quantile_fraction=cfg.pbt_quantile, synch=cfg.pbt_synch, log_config=True)
        space = param_space(cfg)
        # the first trial is the base config as is: the table shows what the search gained over it
        defaults = {k: getattr(base, k) for k in space}
        search = BasicVariantGenerator(points_to_evaluate=[defaults], max_concurrent=concurrent)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=mode, scheduler=scheduler, search_alg=search,
                                        num_samples=cfg.num_samples, max_concurrent_trials=concurrent,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=cfg.name, **store, verbose=1,
                # PBT re-registers the checkpoints it saves, so a count limit would delete one that
                # a trial is about to be restored from; old ones are pruned after the run instead
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if cfg.scheduler == "pbt" else 2),
                failure_config=tune.FailureConfig(max_failures=0)),
        )
    results = tuner.fit()
    rows = _rows(results, cfg)
    # After Ctrl-C Tune stops the running trials (in memory they read TERMINATED); the state it
    # saved first tells which had not finished, and trials never created are missing from it.
    saved = tune.ExperimentAnalysis(storage.join(store["storage_path"], cfg.name),
                                    storage_filesystem=store.get("storage_filesystem")).trials
    open_trials = {t.trial_id for t in saved if t.status not in FINISHED}
    for r in rows:
        if r["trial"] in open_trials and r["stop_reason"] != "completed":
            r["stop_reason"] = "unfinished"
    unfinished = [r["trial"] for r in rows if r["stop_reason"] == "unfinished"]
    if not unfinished and len(saved) < cfg.num_samples:
        unfinished = [f"{cfg.num_samples - len(saved)} not started"]
    text = table_text(rows, cfg.metric)
    log.info("results (%s, %s):\n%s", cfg.metric, mode, text)
    public = [{k: v for k, v in r.items() if k not in ("path", "filesystem")} for r in rows]
    table_json = json.dumps(public, indent=2, default=str)
    storage.write_text(storage.join(meta_dir, "results.json"), table_json, cfg.train.storage)
    storage.write_text(storage.join(meta_dir, "results.txt"), text + "\n", cfg.train.storage)
    summary: dict[str, Any] = {
        "experiment": cfg.name, "storage": experiment, "scheduler": cfg.scheduler, "metric": cfg.metric,
        "mode": mode, "trials": len(rows), "max_concurrent": concurrent,
        "completed": sum(r["stop_reason"] == "completed" for r in rows),
        "stopped_early": sum(r["stop_reason"].startswith("stopped early") for r in rows),
        "errored": sum(r["stop_reason"].startswith("error") for r in rows),
        "table": public,
    }
    if unfinished:
        summary.update(status="interrupted", unfinished=unfinished,
                       resume=f"run again with --resume --set name={cfg.name}",
                       wall_time_s=round(time.time() - t0, 1))
        return summary
    ranked = _rank(rows, cfg)
    if not ranked:
        raise RuntimeError(f"no trial of '{cfg.name}' completed with metric {cfg.metric}; "
                           f"see {storage.join(meta_dir, 'results.txt')}")
    best = ranked[0]
    # trial 0 ran the base config (points_to_evaluate); under PBT it may have been mutated since
    default_row = next((r for r in rows if r["trial"].endswith("_00000")
                        and all(getattr(base, k) == v for k, v in r["config"].items())), None)
    section = {"experiment": cfg.name, "trial": best["trial"], "metric": cfg.metric, "mode": mode,
               "value": best[cfg.metric], "config": best["config"], "scheduler": cfg.scheduler,
               "trials": len(rows),
               "default_config": {k: default_row[k] for k in ("trial", cfg.metric, "epochs", "stop_reason")}
               if default_row else None}
    if cfg.scheduler == "pbt":
        keys = list(cfg.pbt_mutations)
        glob_uri = storage.join(experiment, "pbt_global.txt")
        exploits = 0
        if storage.exists(glob_uri, cfg.train.storage):
            exploits = len(storage.read_text(glob_uri, cfg.train.storage).strip().splitlines())
        # an exploit at the final report restores the last checkpoint and trains nothing more
        schedule = [e for e in pbt_schedule(experiment, best["trial"], best["config"], keys, cfg)
                    if e["from_epoch"] <= (best["epochs"] or 0)]
        section["pbt"] = {"exploits": exploits, "schedule": schedule}
    output = export_best(best, cfg, section, {"tune_results.json": table_json, "tune_results.txt": text + "\n"})
    pruned = _prune(rows, ranked, cfg, experiment)
    summary.update(status="done", best={"trial": best["trial"], cfg.metric: best[cfg.metric],
                                        "config": best["config"], "epochs": best["epochs"]},
                   default_config=section["default_config"], artifact=output,
                   pruned_trials=pruned, wall_time_s=round(time.time() - t0, 1))
    if "pbt" in section:
        summary["pbt"] = section["pbt"]
    storage.write_text(storage.join(meta_dir, "summary.json"), json.dumps(summary, indent=2, default=str),
                       cfg.train.storage)
    return summary


# ---- command line ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from crackscale.cli import add_config_args

    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the tuning run named by `name` (default: the latest in storage_path); "
                        "finished trials are not run again")
    return p


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale.config import load

    return run(load(TuneConfig, args.config, args.set), resume=args.resume)


def add_cli(subparsers: Any) -> None:
    """Register ``crackscale tune``."""
    p = subparsers.add_parser("tune", help="search hyperparameters with Ray Tune (same as jobs/tune.py)",
                              epilog="example: crackscale tune --config jobs/configs/tune.yaml --set scheduler=pbt")
    add_arguments(p)
    p.set_defaults(func=cmd_tune)
