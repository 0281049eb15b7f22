"""After the search: the results table, the best trial's artifact exported (model.json gains a
"tune" section), the PBT schedule it followed, and every other trial's checkpoints pruned."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from crackscale import artifact, storage
from crackscale.config.tune import TuneConfig

log = logging.getLogger(__name__)


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


def rows_of(results: Any, cfg: TuneConfig) -> list[dict[str, Any]]:
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
        rows.append(
            {
                "trial": trial_id,
                "config": dict(r.config or {}),
                cfg.metric: m.get(cfg.metric),
                "epochs": m.get("epochs_run", m.get("epoch")),
                "stop_reason": reason,
                "artifact": m.get("artifact"),
                "path": r.path,
                "filesystem": r.filesystem,
            }
        )
    return rows


def rank(rows: list[dict[str, Any]], cfg: TuneConfig) -> list[dict[str, Any]]:
    done = [r for r in rows if r["stop_reason"] == "completed" and r[cfg.metric] is not None]
    return sorted(done, key=lambda r: r[cfg.metric], reverse=cfg.resolved_mode() == "max")


def table_text(rows: list[dict[str, Any]], metric: str) -> str:
    """The results table as aligned text."""
    head = ["trial", metric, "epochs", "stop_reason", "config"]
    body = [
        [
            r["trial"],
            "-" if r[metric] is None else f"{r[metric]:.4f}",
            str(r["epochs"] or "-"),
            r["stop_reason"],
            json.dumps({k: _short(v) for k, v in r["config"].items()}),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def _short(v: Any) -> Any:
    return float(f"{v:.4g}") if isinstance(v, float) else v


def pbt_schedule(
    experiment: str, trial_id: str, initial: dict[str, Any], keys: list[str], cfg: TuneConfig
) -> list[dict[str, Any]]:
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


def prune(rows: list[dict[str, Any]], ranked: list[dict[str, Any]], cfg: TuneConfig, experiment: str) -> list[str]:
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
        ckpts = sorted(
            i.path
            for i in fs.get_file_info(pafs.FileSelector(r["path"], allow_not_found=True))
            if i.type == pafs.FileType.Directory and Path(i.path).name.startswith("checkpoint_")
        )
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
    storage.write_text(
        storage.join(out, artifact.META_FILE), json.dumps(meta, indent=2, default=str), cfg.train.storage
    )
    return out
