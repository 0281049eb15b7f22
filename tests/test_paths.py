"""Outputs land where the user finds them and they last: relative output paths are resolved once,
in the driver, against the current directory or CRACKSCALE_HOME, and refused under `ray job submit`
(whose working directory is Ray's temporary copy of the project) unless CRACKSCALE_HOME is set."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import PY, ROOT

from crackscale.config.loader import ConfigError
from crackscale.config.tune import TuneConfig
from crackscale.raysession import HOME_ENV, durable

SUBMITTED = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray's job supervisor sets for a submitted driver


@pytest.fixture
def plain_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.delenv(SUBMITTED, raising=False)
    return tmp_path


def test_outputs_resolve_where_they_last(plain_env, monkeypatch):
    assert durable("runs", "storage_path") == str(plain_env / "runs")
    assert durable("s3://bucket/runs", "storage_path") == "s3://bucket/runs"
    assert durable("/data/runs", "storage_path") == "/data/runs" and durable("", "output") == ""
    monkeypatch.setenv(SUBMITTED, "{}")
    with pytest.raises(ConfigError, match=r"config key 'storage_path' is the relative path 'runs'.*CRACKSCALE_HOME"):
        durable("runs", "storage_path")
    assert durable("/data/runs", "storage_path") == "/data/runs"  # absolute: fine when submitted
    monkeypatch.setenv(HOME_ENV, str(plain_env / "home"))
    assert durable("runs", "storage_path") == str(plain_env / "home" / "runs")


def test_tuning_resolves_its_outputs_in_the_driver(plain_env):
    """Trials run in working directories of Ray's: the experiment and its best model are resolved
    before any trial starts, or a relative storage_path would put the trial models there."""
    from crackscale.tuning.driver import _named

    cfg = _named(TuneConfig(storage_path="runs", name="t"), resume=False)
    assert cfg.storage_path == str(plain_env / "runs")
    assert cfg.output == str(plain_env / "runs" / "t" / "best-model")


@pytest.mark.parametrize(
    ("job", "args", "key"),
    [
        ("jobs/train.py", ["--config", "jobs/configs/demo.yaml"], "storage_path"),
        ("jobs/score.py", ["--model", "/nowhere/model", "--input", "/nowhere/in", "--output", "scores"], "output"),
        ("jobs/tune.py", ["--config", "jobs/configs/tune.yaml"], "storage_path"),
    ],
)
def test_a_submitted_job_refuses_relative_outputs_in_one_line(job, args, key):
    env = {k: v for k, v in os.environ.items() if k != HOME_ENV}
    env.update({SUBMITTED: "{}", "RAY_ADDRESS": "local"})
    r = subprocess.run([PY, job, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"config key '{key}' is the relative path" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_private_ray_stops_without_waiting_for_its_monitor():
    """``raysession.stop_autoscaler_monitor`` (registered at exit for a private Ray) reaches into
    Ray's internals: this fails if they change. The monitor is killed, the rest of Ray stops when
    the process ends as every job does (``cli.exit_process``), and nothing of it is left running."""
    code = (
        "import json, os, ray, psutil\n"
        "from crackscale import raysession\n"
        "os.environ['RAY_ADDRESS'] = 'local'\n"
        "raysession.connect(dashboard=False)\n"
        "node = ray._private.worker._global_node\n"
        "pid = node.all_processes['monitor'][0].process.pid\n"
        "before = psutil.pid_exists(pid)\n"
        "stopped = raysession.stop_autoscaler_monitor()\n"
        "pids = [p.process.pid for ps in node.all_processes.values() for p in ps]\n"
        "print(json.dumps({'before': before, 'stopped': stopped, 'after': psutil.pid_exists(pid), 'pids': pids,\n"
        "                  'left': sorted(node.all_processes), 'again': raysession.stop_autoscaler_monitor()}))\n"
        "from crackscale import cli; cli.exit_process(0)  # as every job ends\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"] and out["stopped"] and not out["after"] and out["again"] is False
    assert "monitor" not in out["left"] and {"gcs_server", "raylet"} <= set(out["left"])
    import psutil

    alive = [p for p in out["pids"] if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, "the process ended and left its private Ray's processes running"


def test_a_command_process_runs_its_exit_hooks_then_ends_with_its_code():
    """``cli.exit_process`` (the last line of every job script and of ``crackscale``) runs the
    exit hooks through CPython's ``atexit._run_exitfuncs`` and flushes what was printed: this fails
    if either stops happening."""
    code = (
        "import atexit, sys\n"
        "from crackscale import cli\n"
        "atexit.register(lambda: print('hook ran'))\n"
        "print('summary', end='')\n"
        "sys.stderr.write('error: shown')\n"
        "cli.exit_process(3)\n"
        "print('never')\n"
    )
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (3, "summaryhook ran\n", "error: shown")
