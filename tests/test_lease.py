"""One run per (output, model) at a time: the lease is created atomically (S3: a conditional PUT;
local: an exclusive create), a second run stops naming the holder or waits for it, and the lease
of a run that died is taken over once its heartbeat is older than ``lease_ttl_s``."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, job_env, kill_tree, last_json

from crackscale import query
from crackscale.config.score import ScoreConfig
from crackscale.config.storage import StorageConfig
from crackscale.scoring.lease import Lease, LeaseHeld


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lease_is_exclusive_released_and_taken_over_after_expiry(where, s3_server, s3_bucket, tmp_path):
    out = f"s3://{s3_bucket}/scores" if where == "s3" else str(tmp_path / "scores")
    cfg = ScoreConfig(output=out, lease_ttl_s=1.0, storage=StorageConfig(s3_endpoint=s3_server))
    a = Lease(cfg, "m1", "run-a")
    a.acquire()
    with pytest.raises(LeaseHeld, match=rf"is being scored by run run-a on {socket.gethostname()} \(pid \d+"):
        Lease(cfg, "m1", "run-b").acquire()
    Lease(cfg, "m2", "run-c").acquire()  # another model: another lease
    a.release()
    b = Lease(cfg, "m1", "run-b")
    b.acquire()  # free again
    b._stop.set()  # b dies without releasing: no more heartbeats
    b._thread.join()
    time.sleep(1.5)
    c = Lease(cfg, "m1", "run-c")
    c.acquire()  # b's heartbeat is older than lease_ttl_s: taken over
    with pytest.raises(LeaseHeld, match="run-c"):
        Lease(cfg, "m1", "run-d").acquire()
    b.release()  # a dead run's late release does not drop the lease it lost
    with pytest.raises(LeaseHeld, match="run-c"):
        Lease(cfg, "m1", "run-e").acquire()
    c.release()


def _images(synth_data: Path, dest: Path, n: int) -> Path:
    dest.mkdir(parents=True)
    files = sorted((synth_data / "Positive").glob("*.jpg")) + sorted((synth_data / "Negative").glob("*.jpg"))
    for f in files[:n]:
        (dest / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    return dest


def _job(model: str, inp: Path, out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [PY, "jobs/score.py", "--model", model, "--input", str(inp), "--output", str(out)] + [
        "--set",
        "chunk_size=4",
        "--set",
        "block_size=4",
        "--set",
        f"cache_dir={tmp_path / 'c'}",
        *extra,
    ]


def _commits(out: Path) -> int:
    return len([p for p in out.rglob("part-*.parquet") if "_staging" not in p.parts])


@pytest.mark.slow
def test_concurrent_and_killed_runs_score_every_image_once(synth_data, model_artifact, tmp_path):
    """Run A scores; B, started meanwhile, stops with one line naming A (exit 2); C, started with
    --wait, waits and finds nothing left. Then D is SIGKILLed after its first commit and E, with
    --wait, takes D's lease over once it expires and scores the rest: every image once."""
    n = 40
    inp, out = _images(synth_data, tmp_path / "in", n), tmp_path / "scores"
    model = model_artifact["uri"]
    a = subprocess.Popen(_job(model, inp, out, tmp_path), cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, text=True)
    lease = out / "_leases" / f"model_id={model_artifact['meta']['model_sha256'][:16]}.json"
    t0 = time.monotonic()
    while not lease.exists() and a.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    holder = json.loads(lease.read_text())["run_id"]
    b = subprocess.run(_job(model, inp, out, tmp_path), cwd=ROOT, env=job_env(), capture_output=True, text=True)
    errors = [line for line in b.stderr.splitlines() if line.startswith("error:")]
    assert b.returncode == 2 and len(errors) == 1 and f"being scored by run {holder}" in errors[0], b.stderr[-2000:]
    c = subprocess.run(
        _job(model, inp, out, tmp_path, "--wait"), cwd=ROOT, env=job_env(), capture_output=True, text=True
    )
    assert a.wait(timeout=600) == 0 and c.returncode == 0, c.stderr[-2000:]
    assert last_json(c.stdout)["already_scored"] == n and not lease.exists()

    inp2 = _images(synth_data, tmp_path / "in2", n)
    out2 = tmp_path / "scores2"
    ttl = ["--set", "lease_ttl_s=4"]
    d = subprocess.Popen(_job(model, inp2, out2, tmp_path, *ttl), cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL)
    t0 = time.monotonic()
    while _commits(out2) < 1 and d.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.01)
    assert d.poll() is None, "run D finished before it could be killed"
    kill_tree(d)
    e = subprocess.run(
        _job(model, inp2, out2, tmp_path, *ttl, "--wait"), cwd=ROOT, env=job_env(), capture_output=True, text=True
    )
    assert e.returncode == 0, e.stderr[-3000:]
    s = last_json(e.stdout)
    assert s["already_scored"] >= 4 and s["already_scored"] + s["scored"] == n
    uris = query.open_scores(str(out2)).to_table()["uri"].to_pylist()
    assert len(uris) == len(set(uris)) == n
