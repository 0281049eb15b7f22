"""Ray Tune over real (tiny) training runs: ASHA, PBT, resume after interruption, errors."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import PY, ROOT, last_json, run_job, small_tune_config

from crackscale import artifact
from crackscale.config.loader import ConfigError, load
from crackscale.config.score import ScoreConfig
from crackscale.config.tune import TuneConfig
from crackscale.scoring import run as scoring_run
from crackscale.tuning import driver as tune_driver
from crackscale.tuning import search as tune_search

pytestmark = pytest.mark.slow


# ---- errors a user can cause (no training) ------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("metric=val_f1", "'val_f1' is never reported"),
        ("mode=best", "'mode' must be auto, min or max"),
    ],
)
def test_invalid_config_is_refused_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load(TuneConfig, str(ROOT / "jobs/configs/tune.yaml"), [override])


def test_empty_search_space_is_refused(tmp_path):
    f = tmp_path / "tune.yaml"
    f.write_text((ROOT / "jobs/configs/tune.yaml").read_text().replace("search_space:", "search_space: {}\nold_space:"))
    with pytest.raises(ConfigError, match="unknown config key 'old_space'"):
        load(TuneConfig, str(f))
    f.write_text("search_space: {}\n")
    with pytest.raises(ConfigError, match="config key 'search_space' is empty"):
        load(TuneConfig, str(f))


@pytest.mark.parametrize(
    "space, message",
    [
        ({"data": {"choice": ["/elsewhere"]}}, r"search_space.data': 'data' cannot be searched"),
        ({"head_lr": 0.01}, r"search_space.head_lr' must be one of \{loguniform"),
        ({"dropout": {"uniform": [0.5, 0.1]}}, r"search_space.dropout.uniform' must be \[low, high\]"),
        ({"alpha": {"choice": [0.35, 0.6]}}, r"search_space.alpha': value 0.6 is invalid"),
        ({"batch_size": {"uniform": [8, 64]}}, r"batch_size is not a real number"),
    ],
)
def test_invalid_search_space_names_the_key(space, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        small_tune_config("", tmp_path, search_space=space)


def test_bad_config_exits_2_from_the_job_script():
    r = run_job(["jobs/tune.py", "--config", "jobs/configs/tune.yaml", "--set", "scheduler=hyperband"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: config key 'scheduler' must be asha or pbt" in r.stderr


def test_resources_the_cluster_can_never_satisfy(ray_tune_local, synth_data, tmp_path):
    # ray_local has one node with 4 CPUs
    too_big = small_tune_config(synth_data, tmp_path, train={"cpus_per_worker": 8})
    with pytest.raises(ConfigError, match="no node of the cluster can hold one training worker"):
        tune_search.concurrency(too_big)
    too_many = small_tune_config(synth_data, tmp_path, train={"num_workers": 5})
    with pytest.raises(ConfigError, match=r"one trial needs \{'CPU': 5.0\}.*cluster has only CPU 4"):
        tune_driver.run(too_many)
    # concurrency comes from the cluster and the per-trial shape, capped by max_concurrent
    assert tune_search.concurrency(small_tune_config(synth_data, tmp_path, max_concurrent=0, num_samples=8)) == 4
    assert (
        tune_search.concurrency(
            small_tune_config(synth_data, tmp_path, max_concurrent=0, num_samples=8, train={"num_workers": 2})
        )
        == 2
    )
    assert tune_search.concurrency(small_tune_config(synth_data, tmp_path, max_concurrent=1)) == 1


# ---- real searches ------------------------------------------------------------------------------


def test_asha_stops_weak_trials_and_exports_a_best_artifact_that_scores(ray_tune_local, synth_data, tmp_path):
    cfg = small_tune_config(synth_data, tmp_path, name="asha")
    s = tune_driver.run(cfg)
    assert s["status"] == "done" and s["trials"] == 4 and s["errored"] == 0, s
    # ASHA (grace 1, reduction 4) stopped at least one trial before its last epoch
    stopped = [r for r in s["table"] if r["stop_reason"] == "stopped early (asha)"]
    assert stopped and all(r["epochs"] < 5 for r in stopped), s["table"]
    completed = [r for r in s["table"] if r["stop_reason"] == "completed"]
    assert completed and all(r["epochs"] == 5 for r in completed)
    assert s["best"][cfg.metric] == min(r[cfg.metric] for r in completed)
    # trial 0 ran the base config unchanged
    row0 = next(r for r in s["table"] if r["trial"].endswith("_00000"))
    assert row0["config"] == {"head_lr": 0.002, "dropout": 0.3}
    # the exported artifact is a normal artifact with a "tune" section, and it scores images
    loaded = artifact.load(s["artifact"])
    assert loaded.meta["tune"]["trial"] == s["best"]["trial"]
    assert loaded.meta["tune"]["config"] == s["best"]["config"]
    assert loaded.meta["config"]["head_lr"] == pytest.approx(s["best"]["config"]["head_lr"])
    from crackscale import model as M
    from crackscale.config.loader import replace
    from crackscale.data import labelled
    from crackscale.training import tfdata

    prepared = labelled.scan(replace(cfg.train), str(synth_data))
    ds = tfdata.tf_dataset(
        prepared.images["test"],
        prepared.labels["test"],
        64,
        64,
        False,
        0,
        False,
        antialias=loaded.meta["resize_antialias"],
    )
    p = M.predict(loaded.model, ds)
    assert p.shape == (len(prepared.labels["test"]),) and np.all((p >= 0) & (p <= 1))
    table = json.loads((tmp_path / "tune" / "asha" / "best-model" / "tune_results.json").read_text())
    assert {r["trial"] for r in table} == {r["trial"] for r in s["table"]}
    # only the top-k (2) trials keep checkpoints and trial models
    exp = tmp_path / "tune" / "asha"
    kept = {p.name for p in (exp / "trial-models").iterdir()}
    assert len(kept) <= 2 and s["best"]["trial"] in kept
    for r in s["table"]:
        ckpts = list((exp / r["trial"]).glob("checkpoint_*"))
        assert bool(ckpts) == (r["trial"] in kept), (r["trial"], ckpts)
    # the scorer uses it unchanged (in-process on this Ray: jobs/score.py is a thin wrapper of it)
    sc = scoring_run.run(
        ScoreConfig(
            model=s["artifact"],
            input=str(synth_data / "Positive"),
            output=str(tmp_path / "scores"),
            runtime="tf",
            cache_dir=str(tmp_path / "cache"),
        )
    )
    assert (sc["scored"], sc["failed"]) == (len(list((synth_data / "Positive").glob("*.jpg"))), 0), sc


def test_pbt_exploits_and_reports_the_schedule(ray_tune_local, synth_data, tmp_path):
    cfg = small_tune_config(
        synth_data,
        tmp_path,
        name="pbt",
        scheduler="pbt",
        num_samples=2,
        perturbation_interval=3,
        pbt_synch=True,
        train={"resize_antialias": True},
        search_space={"dropout": {"uniform": [0.1, 0.5]}},
        pbt_mutations={"head_lr": {"loguniform": [1e-4, 3e-2]}},
    )
    s = tune_driver.run(cfg)
    assert s["status"] == "done", s
    # synchronous PBT, 2 trials, quantile 0.5: at epoch 3 the weaker trial copies the stronger
    assert s["pbt"]["exploits"] >= 1, s
    exp = tmp_path / "tune" / "pbt"
    policy = [json.loads(line) for line in (exp / "pbt_global.txt").read_text().splitlines()]
    assert policy and all(p[4] != p[5] for p in policy)  # explore changed the cloned config
    schedule = s["pbt"]["schedule"]
    assert schedule[0]["from_epoch"] == 1 and "head_lr" in schedule[0]
    assert [e["from_epoch"] for e in schedule] == sorted({e["from_epoch"] for e in schedule})
    meta = artifact.read_meta(s["artifact"])
    assert meta["tune"]["pbt"]["schedule"] == schedule
    assert meta["resize_antialias"] is True  # the trials' train config reached the artifact
    assert all(e["from_epoch"] <= s["best"]["epochs"] for e in schedule)
    # an exploited trial restarted from its donor's checkpoint: its epochs keep counting
    assert {p[0] for p in policy}
    for row in s["table"]:
        if row["stop_reason"] == "completed" and (exp / "trial-models" / row["trial"]).is_dir():
            hist = artifact.read_meta(row["artifact"])["history"]
            assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))
    assert s["errored"] == 0, s["table"]


def _epochs(result_json):
    return [json.loads(line).get("epoch") for line in result_json.read_text().splitlines()]


def test_interrupted_run_resumes_without_redoing_finished_trials(synth_data, tmp_path):
    """jobs/tune.py is interrupted (Ctrl-C) mid-search; `crackscale tune --resume` finishes it."""
    import yaml

    cfg = small_tune_config(
        synth_data,
        tmp_path,
        name="resume",
        num_samples=2,
        max_concurrent=1,
        grace_period=10,
        search_space={"head_lr": {"loguniform": [1e-3, 1e-2]}},
    )
    # grace_period 10 > any trial's epochs: nothing stops early, every trial runs to its end; one
    # trial at a time: the first has finished while the second runs
    from crackscale.config.loader import to_dict

    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    exp = tmp_path / "tune" / "resume"
    proc = subprocess.Popen(
        [PY, "jobs/tune.py", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ),
    )
    # interrupt once one trial has finished and another has a checkpoint but is still running
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None:
        # finished = Tune has its final report (the one naming the artifact)
        done = {p.parent.name for p in exp.glob("*_0000*/result.json") if '"artifact"' in p.read_text()}
        # running = reported 1-3 of its 5 epochs (each with a checkpoint): far from its end
        running = {
            p.parent.name for p in exp.glob("*_0000*/result.json") if 1 <= len(p.read_text().splitlines()) <= 3
        } - done
        if done and running:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=600)
    first = last_json(out)
    assert first["status"] == "interrupted", first
    finished = [r["trial"] for r in first["table"] if r["stop_reason"] == "completed"]
    assert finished and first["unfinished"], first["table"]
    stamps = {t: (exp / "trial-models" / t / "model.json").stat().st_mtime for t in finished}
    before = {t: _epochs(exp / t / "result.json") for t in first["unfinished"] if (exp / t / "result.json").exists()}
    started = [t for t, e in before.items() if any(e)]
    assert started, before

    r = subprocess.run(
        [PY, "-m", "crackscale.cli", "tune", "--config", str(config), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = last_json(r.stdout)
    assert s["status"] == "done" and s["trials"] == 2 and s["completed"] == 2, s
    for t in finished:  # not run again: same result lines, same artifact
        assert _epochs(exp / t / "result.json")[-1] is None  # its final report is still its last
        if (exp / "trial-models" / t / "model.json").exists():
            assert (exp / "trial-models" / t / "model.json").stat().st_mtime == stamps[t]
    # an interrupted trial continued from its checkpoint: epochs keep counting, none is redone
    for t in started:
        epochs = [e for e in _epochs(exp / t / "result.json") if e is not None]
        assert epochs == list(range(1, 6)), (t, before[t], epochs)
    assert artifact.load(s["artifact"]).meta["tune"]["trials"] == 2
