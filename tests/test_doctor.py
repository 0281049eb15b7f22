"""``crackscale doctor`` against a real local Ray and the loopback S3 server, and against dead
endpoints (a clear FAIL with a fix, exit status 1); plus every subcommand's help shows an example."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import PY, ROOT, free_port

from crackscale import doctor
from crackscale.config.storage import StorageConfig


def run_doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(env or os.environ, AWS_EC2_METADATA_DISABLED="true")  # never ask an instance-metadata service
    return subprocess.run(
        [PY, "-m", "crackscale.cli", "doctor", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def by_name(stdout: str) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(stdout)}


def test_doctor_all_good(ray_local, s3_server, s3_bucket):
    gcs = ray_local.get_runtime_context().gcs_address
    r = run_doctor("--ray-address", gcs, "--s3-endpoint", s3_server, "--bucket", f"s3://{s3_bucket}/x/", "--json")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    checks = by_name(r.stdout)
    assert checks["python"]["status"] == "ok" and checks["tensorflow"]["status"] == "ok"
    assert checks["tensorflow"]["detail"].startswith("2.21")
    assert checks["ray cluster"]["status"] == "ok" and "1 node(s), 4 CPUs" in checks["ray cluster"]["detail"]
    assert checks["s3"]["status"] == "ok" and f"bucket {s3_bucket} exists" in checks["s3"]["detail"]
    assert checks["jpeg decoder"]["status"] == "ok", checks["jpeg decoder"]
    assert checks["gpus"]["status"] in ("ok", "warn")  # CPU-only machines get a warning, not a failure
    assert not [c for c in checks.values() if c["status"] == "fail"]


def test_doctor_names_what_to_fix(s3_server):
    dead = f"http://127.0.0.1:{free_port()}"
    r = run_doctor("--ray-address", f"127.0.0.1:{free_port()}", "--s3-endpoint", dead)
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    s3 = next(i for i, line in enumerate(lines) if line.startswith("FAIL  s3"))
    assert f"cannot reach S3 endpoint {dead}" in lines[s3] and "AWS_ENDPOINT_URL" in lines[s3 + 1]
    ray_line = next(line for line in lines if line.startswith("FAIL  ray cluster"))
    assert "cannot reach Ray at 127.0.0.1:" in ray_line and "Connection refused" in ray_line
    assert lines[-1] == "2 problem(s) to fix"


def test_doctor_checks_in_process(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    c = doctor.check_s3(StorageConfig(s3_endpoint=s3_server), "s3://no-such-bucket-here")
    assert c.status == "fail" and c.detail == f"bucket no-such-bucket-here not found at {s3_server}"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    c = doctor.check_s3(StorageConfig(s3_endpoint=s3_server), s3_bucket)
    assert c.status == "fail" and "no AWS credentials" in c.detail and "AWS_ACCESS_KEY_ID" in c.fix
    dash = f"http://127.0.0.1:{free_port()}"
    c = doctor.check_ray(dash)
    assert c.status == "fail" and c.detail.startswith(f"cannot reach the job server {dash}")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert doctor.check_ray("").status == "warn"
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    assert doctor.check_s3(StorageConfig(), "").status == "skip"  # never probes AWS itself unless asked to


SUBCOMMANDS = ("train", "synth", "score", "query", "tune", "report", "doctor", "repair")


def test_cli_help_shows_examples():
    """`crackscale --help` and every subcommand's help show an example (report/doctor included)."""
    r = subprocess.run([PY, "-m", "crackscale.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "examples:" in r.stdout, r.stderr[-2000:]
    for sub in SUBCOMMANDS:
        r = subprocess.run(
            [PY, "-m", "crackscale.cli", sub, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, (sub, r.stderr[-2000:])
        assert "example" in r.stdout and f"crackscale {sub}" in r.stdout, (sub, r.stdout)
