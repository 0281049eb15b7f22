"""jobs/train.py as users run it: kill + --resume, a 2-node cluster, and the CLI's clear errors;
jobs/score.py and jobs/query.py submitted by hand (`ray job submit` with the token) to a
`ray start --head` cluster. The README's own commands: test_readme.py."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, last_json, run_job, upload_tree

pytestmark = pytest.mark.slow

TINY = [
    "--set",
    "weights=none",
    "--set",
    "image_size=64",
    "--set",
    "alpha=0.35",
    "--set",
    "group_size=5",
    "--set",
    "head_lr=0.002",
    "--set",
    "bn_momentum=0.7",
]


def test_ray_job_submit_scoring_and_query_on_s3(ray_head, s3_server, s3_bucket, synth_data, model_artifact, tmp_path):
    """The nightly job as the README submits it: S3 images in, S3 Parquet out, on the `ray start`
    cluster; a second submit the next night scores only the new uploads; the query job reads it."""
    from crackscale import query
    from crackscale.config.storage import StorageConfig

    imgs = tmp_path / "imgs"
    (imgs / "site-a").mkdir(parents=True)
    for p in sorted((synth_data / "Positive").glob("*.jpg"))[:6] + sorted((synth_data / "Negative").glob("*.jpg"))[:6]:
        (imgs / "site-a" / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    upload_tree(s3_server, imgs, s3_bucket, "inspections")
    ray = str(Path(PY).parent / "ray")
    env = dict(ray_head["env"])
    env.pop("RAY_ADDRESS")
    out = f"s3://{s3_bucket}/scores/"

    def submit(*args: str) -> dict:
        cmd = [ray, "job", "submit", "--working-dir", ".", "--", "python", *args]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, r.stdout[-4000:] + r.stderr[-4000:]
        return r

    score = [
        "jobs/score.py",
        "--model",
        model_artifact["uri"],
        "--input",
        f"s3://{s3_bucket}/inspections/",
        "--output",
        out,
        "--set",
        "chunk_size=5",
        "--set",
        "batch_size=4",
        "--set",
        "num_actors=1",
        "--set",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    s1 = last_json(submit(*score).stdout)
    assert (s1["listed"], s1["scored"], s1["failed"]) == (12, 12, 0), s1
    # the next night: two new uploads
    new = sorted((synth_data / "Positive").glob("*.jpg"))[10:12]
    for p in new:
        (imgs / "site-b").mkdir(exist_ok=True)
        (imgs / "site-b" / p.name).write_bytes(p.read_bytes())
    upload_tree(s3_server, imgs / "site-b", s3_bucket, "inspections/site-b")
    s2 = last_json(submit(*score).stdout)
    assert (s2["listed"], s2["already_scored"], s2["scored"]) == (14, 12, 2), s2
    t = query.open_scores(out, StorageConfig(s3_endpoint=s3_server)).to_table(columns=["uri"])
    assert t.num_rows == 14 and len(set(t["uri"].to_pylist())) == 14
    q = submit("jobs/query.py", "--output", out, "counts", "--by", "prefix", "--format", "json")
    lines = q.stdout.splitlines()  # the JSON list: from a line "[" to a line "]"
    rows = json.loads("\n".join(lines[lines.index("[") : len(lines) - lines[::-1].index("]")]))
    assert {r["prefix"].rstrip("/").rsplit("/", 1)[-1]: r["images"] for r in rows} == {"site-a": 12, "site-b": 2}, rows
    # token authentication is on: the same client without the token is refused
    bare = dict(env, RAY_AUTH_MODE="disabled")
    refused = subprocess.run([ray, "job", "list"], env=bare, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()


def test_killed_run_resumes_without_redoing_epochs(synth_data, tmp_path):
    runs = tmp_path / "runs"
    args = [
        "jobs/train.py",
        "--config",
        "jobs/configs/demo.yaml",
        "--set",
        f"data={synth_data}",
        "--set",
        f"storage_path={runs}",
        "--set",
        "name=killme",
        "--set",
        "head_epochs=6",
        "--set",
        "fine_tune_epochs=2",
        "--set",
        "limit_per_class=60",
        "--set",
        "patience=10",
        *TINY,
    ]
    proc = subprocess.Popen(
        [PY, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    snapshot = runs / "killme" / "checkpoint_manager_snapshot.json"

    def committed_epochs() -> list[int]:
        """Epochs whose checkpoints Ray Train has registered (what a restore can see)."""
        try:
            d = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            return []
        return [r["metrics"]["epoch"] for r in d.get("checkpoint_results", [])]

    deadline = time.time() + 1200
    try:
        while time.time() < deadline and len(committed_epochs()) < 2:
            assert proc.poll() is None, "training finished before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert not (runs / "killme" / "model" / "model.json").exists()
    last = max(committed_epochs())
    assert last >= 2
    out = run_job(args + ["--resume"])
    assert out.returncode == 0, out.stderr[-4000:]
    summary = last_json(out.stdout)
    meta = json.loads((runs / "killme" / "model" / "model.json").read_text())
    # restarted right after the last committed epoch: nothing committed is redone
    # (Ray may register a checkpoint after the snapshot we read: resuming later is fine, earlier is not)
    assert len(summary["resumed_at_epochs"]) == 1 and summary["resumed_at_epochs"][0] >= last, (summary, last)
    epochs = [h["epoch"] for h in meta["history"]]
    assert epochs == list(range(1, 9)), epochs  # each epoch once: nothing redone, nothing skipped
    # resuming a finished run is refused clearly; so is a new run reusing the name
    again = run_job(args)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_two_workers_on_two_nodes_learn(ray_two_nodes, synth_data, tmp_path):
    """MultiWorkerMirroredStrategy across 2 Train workers, one per node (2 CPUs each), learns, and
    averages its last two head epochs' weights (each worker refits BatchNorm on its shard)."""
    import ray
    from conftest import check_learned, small_train_config

    from crackscale import artifact
    from crackscale.training import driver as train_driver

    cfg = small_train_config(synth_data, tmp_path, name="twonode", num_workers=2, cpus_per_worker=2, swa_epochs=2)
    summary = train_driver.run(cfg)
    meta = artifact.read_meta(summary["artifact"])
    assert meta["num_workers"] == 2 and meta["num_replicas"] == 2
    assert meta["averaged_epochs"] == [h["epoch"] for h in meta["history"] if h["phase"] == "head"][-2:]
    assert meta["strategy"] == "MultiWorkerMirroredStrategy"
    check_learned(summary, meta)
    # with 2 CPUs per worker and 2 CPUs per node, the workers must sit on different nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


def test_two_workers_on_two_nodes_learn_from_ray_data_shards(ray_two_nodes, s3_server, s3_bucket, synth_data, tmp_path):
    """ingest: ray_data from S3: the driver holds no image bytes, Ray Data tasks decode anew each
    epoch (ingest_cache: false) on the CPUs the workers leave free, and each of 2 MWMS workers (one
    per node) trains on its shard of train and val. The manifest is the one ingest: driver makes."""
    import csv
    import io

    from conftest import check_learned, small_train_config, upload_tree

    from crackscale import artifact, storage
    from crackscale.data import labelled
    from crackscale.training import driver as train_driver

    upload_tree(s3_server, synth_data, s3_bucket, "shards")
    uri = f"s3://{s3_bucket}/shards"
    cfg = small_train_config(
        uri,
        tmp_path,
        name="shards",
        num_workers=2,
        cpus_per_worker=1,
        ingest="ray_data",
        ingest_cache="false",
        int8=True,
    )
    summary = train_driver.run(cfg)
    meta = artifact.read_meta(summary["artifact"])
    assert meta["num_workers"] == 2 and meta["strategy"] == "MultiWorkerMirroredStrategy"
    assert meta["data_stats"]["ingest_cached"] is False
    check_learned(summary, meta)
    want = labelled.scan(cfg, uri)
    assert meta["manifest_hash"] == want.manifest_hash
    # every test image scored once, with its label, in the artifact's per-image predictions
    rows = list(csv.DictReader(io.StringIO(storage.read_text(summary["artifact"] + "/test_predictions.csv"))))
    test = {r["uri"]: r["label"] for r in want.manifest if r["split"] == "test"}
    assert sorted(r["uri"] for r in rows) == sorted(test) and all(int(r["label"]) == test[r["uri"]] for r in rows)
    # the int8 export was calibrated and measured on validation images read by URI
    assert meta["litert_int8"]["val"]["n"] == sum(want.stats["per_split"]["val"].values())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "bogus=1"], "unknown config key 'bogus'"),
        (["--set", "head_epochs=x"], "'head_epochs' must be an integer"),
        (["--set", "data=/no/such/dir"], "data path not found: /no/such/dir"),
        (
            ["--set", "data=s3://bucket/x", "--set", "storage.s3_endpoint=http://127.0.0.1:9"],
            "cannot access s3://bucket/x (endpoint http://127.0.0.1:9)",
        ),
        (["--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
    ],
)
def test_cli_errors_are_one_clear_line(args, needle, tmp_path):
    out = run_job(["-m", "crackscale.cli", "train", *args, "--set", f"storage_path={tmp_path}"], timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_empty_class_folder_error(tmp_path, synth_data):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(synth_data / "Negative", d / "Negative")
    (d / "Positive").mkdir()
    out = run_job(["jobs/train.py", "--set", f"data={d}", "--set", f"storage_path={tmp_path}"], timeout=120)
    assert out.returncode == 2 and f"class folder is empty: {d}/Positive" in out.stderr


def test_benchmark_train_prints_both_rates(tmp_path):
    """Plain fit, Ray Train with each ingest mode, and the driver's peak memory for listing + split."""
    args = ["--epochs", "2", "--per-class", "40", "--image-size", "64", "--listing", "400,2000"]
    out = run_job(["jobs/benchmark_train.py", *args, "--workdir", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    r = last_json(out.stdout)
    assert r["plain_fit_img_s"] > 0 and r["ray_train_1_worker_img_s"] > 0 and r["ray_data_1_worker_img_s"] > 0
    assert r["ray_overhead_ratio"] == pytest.approx(r["plain_fit_img_s"] / r["ray_train_1_worker_img_s"], rel=0.01)
    assert r["ray_data_over_driver_ingest"] == pytest.approx(
        r["ray_data_1_worker_img_s"] / r["ray_train_1_worker_img_s"], rel=0.01
    )
    assert len(r["plain_epoch_s"]) == 2 and len(r["ray_epoch_s"]) == 2 and len(r["ray_data_epoch_s"]) == 2
    small, large = r["listing"]["400"], r["listing"]["2000"]
    assert (small["images"], large["images"]) == (400, 2000)  # distinct files: none dropped
    assert large["peak_rss_mib"] >= large["floor_rss_mib"] > 50
    assert r["listing_peak_rss_ratio"] == pytest.approx(large["peak_rss_mib"] / small["peak_rss_mib"], rel=0.01)
    assert not (tmp_path / "training").exists()  # the training runs are removed after
