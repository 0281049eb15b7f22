"""Faults: a flaky S3 endpoint (503 SlowDown / 500 / TCP resets through a fault-injecting proxy on
127.0.0.1), an endpoint that dies mid-run, a dead endpoint, a missing bucket, denied access, a
Train worker SIGKILLed mid-epoch, a node removed from a 2-node cluster during scoring.

Outcome everywhere: every image exactly once after the run (or its re-run), or a clear error
within a bounded time and nothing half-written. Driver kill + re-run and a model actor killed
mid-run are in tests/test_score.py; a training driver kill + --resume in tests/test_train_jobs.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import last_json, run_job, small_train_config, upload_tree

from crackscale import query, storage
from crackscale.config.score import ScoreConfig
from crackscale.config.storage import StorageConfig
from crackscale.scoring import listing as scoring_listing
from crackscale.scoring import run as scoring_run


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Keys under ``prefix``, listed straight from the S3 server (not through the proxy)."""
    import boto3

    pages = (
        boto3.client("s3", endpoint_url=endpoint)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def stage_images(synth_data: Path, dest: Path, n: int, bad: bool = True) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    for p in (
        sorted((synth_data / "Positive").glob("*.jpg"))[: n // 2]
        + sorted((synth_data / "Negative").glob("*.jpg"))[: n - n // 2]
    ):
        (dest / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    if bad:
        (dest / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return n + int(bad)


def cfg_for(model: str, inp: str, out: str, endpoint: str, tmp_path: Path, **kw) -> ScoreConfig:
    base = dict(
        model=model,
        input=inp,
        output=out,
        batch_size=8,
        block_size=8,
        chunk_size=10,
        runtime="tf",
        num_actors=1,
        read_threads=4,
        cache_dir=str(tmp_path / "cache"),
        storage=StorageConfig(s3_endpoint=endpoint),
    )
    base.update(kw)
    return ScoreConfig(**base)


def scores_direct(out: str, s3_server: str):
    """The committed rows, read straight from the S3 server."""
    return query.open_scores(out, StorageConfig(s3_endpoint=s3_server)).to_table()


@pytest.mark.slow
def test_flaky_s3_every_image_exactly_once(
    ray_local, s3_server, s3_bucket, faulty_s3, synth_data, model_artifact, tmp_path
):
    """Every first attempt of every request fails, and 25 % of the rest (never 3 in a row):
    listing, HEAD/GET of images, Parquet reads and PUTs all retry with backoff; the run completes
    with one row per image and no transient failure recorded as an image error."""
    n = stage_images(synth_data, tmp_path / "imgs" / "site-a", 30)
    upload_tree(s3_server, tmp_path / "imgs", s3_bucket, "images")
    proxy = faulty_s3(rate=0.25, max_consecutive=2, fail_first=True, seed=1)
    inp, out = f"s3://{s3_bucket}/images/", f"s3://{s3_bucket}/scores"
    cfg = cfg_for(model_artifact["uri"], inp, out, proxy.endpoint, tmp_path)

    s = scoring_run.run(cfg)
    assert (s["listed"], s["scored"], s["failed"]) == (n, n - 1, 1), s
    t = scores_direct(out, s3_server)
    uris = t["uri"].to_pylist()
    assert len(uris) == n and len(set(uris)) == n
    assert set(uris) == {f"s3://{s3_bucket}/{k}" for k in s3_keys(s3_server, s3_bucket, "images/")}
    errors = [e for e in t["error"].to_pylist() if e]
    assert len(errors) == 1 and errors[0].startswith("decode"), errors  # the truncated file only
    # the faults really hit every kind of request: listing, object reads, commits (PUT)
    hit = proxy.faulted_requests
    assert {"slowdown", "reset", "internal"} <= set(proxy.faults), proxy.faults
    assert any(m == "GET" and "list-type=2" in p for m, p in hit)
    assert sum(1 for m, p in hit if f"/{s3_bucket}/images/" in p) >= n
    assert any(m in ("PUT", "POST") and "/scores/model_id" in p for m, p in hit), sorted(
        {(m, p.split("?")[0][:60]) for m, p in hit if m != "GET"}
    )

    # a re-run through the same flaky endpoint scores nothing twice
    s2 = scoring_run.run(cfg)
    assert (s2["already_scored"], s2["scored"], s2["failed"]) == (n, 0, 0)
    assert scores_direct(out, s3_server).num_rows == n


def forwarded(proxy, settle_s: float = 0.5) -> int:
    """The proxy's forwarded count once it stops changing (it counts after sending the answer)."""
    last, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline and proxy.forwarded != last:
        last = proxy.forwarded
        time.sleep(settle_s)
    return proxy.forwarded


def test_an_s3_object_read_is_one_get_and_its_failures_are_classified(s3_server, s3_bucket, faulty_s3, tmp_path):
    """storage.read_object on S3: one GET per object (no HEAD); a missing key and a denied read become
    the image's error row; a transient fault is retried, and one that never ends is raised."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="a.jpg", Body=b"jpeg bytes")
    uri = f"s3://{s3_bucket}/a.jpg"
    proxy = faulty_s3(rate=0.0)
    cfg = cfg_for("", "", "", proxy.endpoint, tmp_path)
    assert storage.read_object(uri, cfg.storage) == b"jpeg bytes"
    assert forwarded(proxy) == 1 and proxy.faulted_requests == []  # one request: a GET
    assert storage.read_object(f"s3://{s3_bucket}/gone.jpg", cfg.storage) == "read: not found"
    flaky = faulty_s3(rate=0.0, fail_first=True)  # every request's first attempt fails
    assert storage.read_object(uri, cfg_for("", "", "", flaky.endpoint, tmp_path).storage) == b"jpeg bytes"
    assert len(flaky.faulted_requests) == 1 and forwarded(flaky) == 1
    denied = storage.read_object(uri, cfg_for("", "", "", faulty_s3(mode="deny").endpoint, tmp_path).storage)
    assert denied.startswith("read: ACCESS_DENIED"), denied
    dead = faulty_s3(rate=1.0, max_consecutive=0)
    with pytest.raises(storage.StorageError, match=rf"cannot read {uri} \(endpoint {dead.endpoint}\) after 1 rounds"):
        storage.read_object(uri, cfg_for("", "", "", dead.endpoint, tmp_path).storage, attempts=1)
    assert len(dead.faulted_requests) == 5  # the client's own 5 attempts


@pytest.mark.slow
def test_credentials_expiring_mid_run_stop_the_run_and_the_rerun_scores_every_image_once(
    ray_local, s3_server, s3_bucket, faulty_s3, synth_data, model_artifact, tmp_path
):
    """After 12 image GETs the endpoint answers ExpiredToken: the run stops with one line naming
    the endpoint and the error (no image gets a ``read:`` row for it); with the credentials renewed
    the re-run scores every image once. A denied object while others read stays that image's row."""
    n = stage_images(synth_data, tmp_path / "imgs" / "site-a", 40, bad=False)
    upload_tree(s3_server, tmp_path / "imgs", s3_bucket, "images")
    proxy = faulty_s3(rate=0.0, expire_after=12)
    inp, out = f"s3://{s3_bucket}/images/", f"s3://{s3_bucket}/scores"
    cfg = cfg_for(model_artifact["uri"], inp, out, proxy.endpoint, tmp_path, chunk_size=4, block_size=4, batch_size=4)
    with pytest.raises(storage.CredentialsError) as e:
        scoring_run.run(cfg)
    assert str(e.value).startswith(f"credentials refused by the S3 endpoint {proxy.endpoint} (ExpiredToken")
    committed = scores_direct(out, s3_server) if s3_keys(s3_server, s3_bucket, "scores/") else None
    if committed is not None:
        assert committed["error"].null_count == committed.num_rows  # no image failed for the credentials
    proxy.expire_after = None  # renewed
    s = scoring_run.run(cfg)
    t = scores_direct(out, s3_server)
    assert t.num_rows == n and len(set(t["uri"].to_pylist())) == n and t["error"].null_count == n
    assert s["already_scored"] + s["scored"] == n and s["failed"] == 0


@pytest.mark.slow
def test_a_commit_put_stored_but_unanswered_is_retried_and_every_image_is_once(
    ray_local, s3_server, s3_bucket, faulty_s3, synth_data, model_artifact, tmp_path
):
    """The proxy forwards the first three chunk PUTs and drops their answers: the client retries
    each (the same object, the same bytes), the run completes, and every image is there once."""
    n = stage_images(synth_data, tmp_path / "imgs" / "site-a", 24, bad=False)
    upload_tree(s3_server, tmp_path / "imgs", s3_bucket, "images")
    proxy = faulty_s3(rate=0.0, drop_put_answers=3)
    inp, out = f"s3://{s3_bucket}/images/", f"s3://{s3_bucket}/scores"
    s = scoring_run.run(cfg_for(model_artifact["uri"], inp, out, proxy.endpoint, tmp_path, chunk_size=4))
    assert len(proxy.dropped) == 3 and s["chunks"] == 6 and s["scored"] == n, (proxy.dropped, s)
    t = scores_direct(out, s3_server)
    assert t.num_rows == n and len(set(t["uri"].to_pylist())) == n
    assert len([k for k in s3_keys(s3_server, s3_bucket, "scores/") if "/part-" in k]) == 6


def test_s3_listing_shares_the_bounded_client(s3_server, s3_bucket, faulty_s3, tmp_path):
    """Listing pages through storage.s3_client: a fault is retried, and an endpoint that never
    answers well fails the listing after the same 5 attempts, with an error naming it."""
    import boto3

    for k in ("in/a.jpg", "in/b.png", "in/c.txt", "in/sub/d.jpeg"):
        boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key=k, Body=b"x")
    flaky = faulty_s3(rate=0.0, fail_first=True)
    cfg = cfg_for("", f"s3://{s3_bucket}/in/", "", flaky.endpoint, tmp_path)
    got = [o["uri"] for o in scoring_listing.list_input(cfg)]
    assert sorted(got) == [f"s3://{s3_bucket}/in/{k}" for k in ("a.jpg", "b.png", "sub/d.jpeg")]
    assert len(flaky.faulted_requests) == 1
    dead = faulty_s3(rate=1.0, max_consecutive=0)
    with pytest.raises(storage.StorageError, match=rf"cannot list s3://{s3_bucket}/in/ \(endpoint {dead.endpoint}\)"):
        list(scoring_listing.list_input(cfg_for("", f"s3://{s3_bucket}/in/", "", dead.endpoint, tmp_path)))
    assert len(dead.faulted_requests) == 5


def test_s3_listing_walks_folders_in_parallel(s3_server, s3_bucket, faulty_s3, tmp_path, monkeypatch):
    """``list_threads``: a prefix with more keys than one request returns (``LIST_PROBE_KEYS``, 20
    here) is walked folder by folder and the folders are listed at the same time (over an endpoint
    with 50 ms per request); the objects are exactly the flat listing's, each once. A small prefix
    is one request. A failing folder listing fails the whole listing with an error naming the endpoint, and a
    listing the caller stops reading leaves no thread behind."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = ["in/top.jpg", "in/site-03/notes.txt", "in/site-00/", "in2/x.jpg", "other/y.jpg"]
    keys += [
        f"in/site-{s:02d}/2026-11-{d:02d}/{i}.{'JPG' if i == 2 else 'jpg'}"
        for s in range(12)
        for d in (1, 2)
        for i in range(3)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=s3_bucket, Key=k, Body=b"x"), keys))
    want = sorted(f"s3://{s3_bucket}/{k}" for k in keys if k.startswith("in/") and k.lower().endswith(".jpg"))
    assert len(want) == 73
    monkeypatch.setattr(scoring_listing, "LIST_PROBE_KEYS", 20)

    def listed(prefix: str, threads: int, **proxy):
        p = faulty_s3(**{"rate": 0.0, "latency": 0.05, **proxy})
        cfg = cfg_for("", f"s3://{s3_bucket}/{prefix}", "", p.endpoint, tmp_path, list_threads=threads)
        return [o["uri"] for o in scoring_listing.list_input(cfg)], p

    one, p1 = listed("in/", 1)
    assert sorted(one) == want and p1.max_in_flight == 1 and p1.forwarded == 1
    for threads in (4, 16):  # 12 site folders: listed flat with 4 threads, walked one level more with 16
        got, p = listed("in/", threads)
        assert sorted(got) == want and len(got) == len(set(got)), threads
        assert p.max_in_flight >= 2, (threads, p.max_in_flight)
        walks = [q for q in p.paths if "delimiter=" in q]
        assert len(walks) == (1 if threads == 4 else 13), (threads, walks)
        assert "max-keys=20" in p.paths[0]  # the probe
    got, _ = listed("in", 16)  # no trailing slash: in2/ is under the prefix too
    assert sorted(got) == sorted(want + [f"s3://{s3_bucket}/in2/x.jpg"])
    small, p = listed("in/site-03/", 16)
    assert len(small) == 6 and p.forwarded == 1 and p.max_in_flight == 1

    for threads in (4, 16):  # site-05 fails while listed flat (4), or while walked (16)
        with pytest.raises(storage.StorageError, match=rf"cannot list s3://{s3_bucket}/in/ \(endpoint http://127"):
            listed("in/", threads, rate=1.0, max_consecutive=0, match=lambda m, path: "site-05" in path)
    cfg = cfg_for("", f"s3://{s3_bucket}/in/", "", s3_server, tmp_path, list_threads=4)
    it = scoring_listing.list_input(cfg)
    assert next(it)["uri"].startswith(f"s3://{s3_bucket}/in/")
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("s3-list")]


@pytest.mark.slow
def test_endpoint_dies_mid_run_then_rerun_completes(
    ray_local, s3_server, s3_bucket, faulty_s3, synth_data, model_artifact, tmp_path
):
    """Listing works, then every object read fails (an outage): the run stops with a clear error
    naming the endpoint instead of writing 'read:' error rows; no Parquet file is written. When the
    endpoint is back, a re-run scores every image exactly once."""
    n = stage_images(synth_data, tmp_path / "imgs", 12, bad=False)
    upload_tree(s3_server, tmp_path / "imgs", s3_bucket, "images")
    proxy = faulty_s3(rate=1.0, max_consecutive=0, match=lambda m, p: p.startswith(f"/{s3_bucket}/images/"))
    out = f"s3://{s3_bucket}/scores"
    cfg = cfg_for(model_artifact["uri"], f"s3://{s3_bucket}/images/", out, proxy.endpoint, tmp_path, chunk_size=100)
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"cannot read s3://.*endpoint http://127\.0\.0\.1") as e:
        scoring_run.run(cfg)
    assert time.monotonic() - t0 < 300, "the outage was not reported within a bounded time"
    assert proxy.faults and "read: " not in str(e.value)
    assert s3_keys(s3_server, s3_bucket, "scores/") == []  # nothing half-written, no summary

    proxy.rate = 0.0  # the endpoint recovers
    s = scoring_run.run(cfg)
    assert (s["listed"], s["scored"], s["failed"]) == (n, n, 0)
    uris = scores_direct(out, s3_server)["uri"].to_pylist()
    assert len(uris) == n and len(set(uris)) == n


@pytest.mark.parametrize(
    "case", ["dead-endpoint", "nothing-listening", "denied", "missing-input-bucket", "missing-output-bucket"]
)
def test_permanent_storage_failures_are_clear_bounded_and_write_nothing(
    case, s3_server, s3_bucket, faulty_s3, model_artifact, tmp_path
):
    """Each fails before any Ray work, with a StorageError naming the bucket/endpoint."""
    from conftest import free_port

    boto_out = f"s3://{s3_bucket}/scores"
    inp, out, endpoint = f"s3://{s3_bucket}/images/", boto_out, s3_server
    if case == "dead-endpoint":
        endpoint = faulty_s3(rate=1.0, max_consecutive=0).endpoint
        want = rf"endpoint {endpoint}"
    elif case == "nothing-listening":
        endpoint = f"http://127.0.0.1:{free_port()}"
        want = rf"endpoint {endpoint}"
    elif case == "denied":
        endpoint = faulty_s3(mode="deny").endpoint
        want = r"ACCESS_DENIED|AccessDenied"
    elif case == "missing-input-bucket":
        inp = "s3://no-such-input-bucket/images/"
        want = r"no-such-input-bucket.*NoSuchBucket|NoSuchBucket.*no-such-input-bucket|cannot list s3://no-such-input-bucket"
    else:
        out = "s3://no-such-output-bucket/scores"
        want = r"bucket not found: s3://no-such-output-bucket"
    cfg = cfg_for(model_artifact["uri"], inp, out, endpoint, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=want):
        scoring_run.run(cfg)
    assert time.monotonic() - t0 < 120
    assert s3_keys(s3_server, s3_bucket) == []


@pytest.mark.slow
def test_denied_job_exits_with_one_clear_line(s3_server, s3_bucket, faulty_s3, model_artifact, tmp_path):
    """jobs/score.py as users run it: exit 2 and one 'error:' line, no traceback."""
    proxy = faulty_s3(mode="deny")
    r = run_job(
        [
            "jobs/score.py",
            "--model",
            model_artifact["uri"],
            "--input",
            f"s3://{s3_bucket}/images/",
            "--output",
            f"s3://{s3_bucket}/scores",
            "--set",
            f"storage.s3_endpoint={proxy.endpoint}",
        ],
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot access s3://") and "ACCESS_DENIED" in last, last
    assert s3_keys(s3_server, s3_bucket) == []


def _run_watched(main, watcher, stop: threading.Event):
    """``main()`` in this thread (Ray Train installs signal handlers) while ``watcher`` polls in
    another and injects the fault; the watcher is stopped and joined whatever happens."""
    th = threading.Thread(target=watcher, daemon=True)
    th.start()
    try:
        return main()
    finally:
        stop.set()
        th.join()


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered (a checkpoint dir appears before it is registered)."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_train_worker_killed_mid_epoch_continues_from_checkpoint(ray_local, synth_data, tmp_path):
    """SIGKILL the Ray Train worker process after its second checkpoint: Train restarts the worker
    group (FailureConfig max_failures) from the last checkpoint and the run finishes, every epoch
    in the history once. With ingest: ray_data, so the restarted worker takes its Ray Data shard
    anew (ingest: driver resumes through jobs/train.py --resume in test_train_jobs.py). Weight
    averaging over all six head epochs keeps the epochs from before the kill."""
    import psutil

    from crackscale.training import callbacks as train_callbacks
    from crackscale.training import driver as train_driver

    cfg = small_train_config(
        synth_data,
        tmp_path,
        name="wkill",
        head_epochs=6,
        fine_tune_epochs=0,
        min_epochs=0,
        patience=10,
        limit_per_class=30,
        image_size=64,
        max_failures=2,
        lr_schedule="cosine",
        warmup_epochs=2,
        swa_epochs=6,
        ingest="ray_data",
    )
    me = psutil.Process(os.getpid())
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            # 2 on disk: the first is surely registered by the Train controller (the newest
            # may still be in flight when the worker dies)
            if _registered_checkpoints(tmp_path / "runs" / "wkill") >= 2:
                for p in me.children(recursive=True):  # only this test's Ray (a child of pytest)
                    try:
                        if p.cmdline() and p.cmdline()[0].startswith("ray::RayTrainWorker"):
                            p.send_signal(signal.SIGKILL)
                            killed.append(p.pid)
                            break
                    except psutil.Error:
                        continue
            time.sleep(0.2)

    summary = _run_watched(lambda: train_driver.run(cfg), killer, stop)
    assert killed, "no RayTrainWorker was killed mid-run: the test proved nothing"
    result = {"summary": summary}
    meta = json.loads(Path(result["summary"]["artifact"], "model.json").read_text())
    assert meta["resumed_at_epochs"] and meta["resumed_at_epochs"][0] >= 1, meta["resumed_at_epochs"]
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4, 5, 6]
    assert meta["averaged_epochs"] == [1, 2, 3, 4, 5, 6]  # the epochs before the kill came back from the checkpoint
    assert meta["data_stats"]["ingest_cached"] is True  # 60 small images: decoded once
    # the warm-up + cosine schedule continued across the restart (keyed on the absolute epoch)
    assert [h["lr"] for h in meta["history"]] == pytest.approx(
        [train_callbacks.phase_lr(cfg.head_lr, i, 6, cosine=True, warmup=2) for i in range(6)], rel=1e-5
    )


def _node_processes(node, needle: str) -> list:
    """Processes of one ``cluster_utils`` node (children of its raylet) whose cmdline has ``needle``."""
    import psutil

    found = []
    for info in node.all_processes.get("raylet", []):
        for p in psutil.Process(info.process.pid).children(recursive=True):
            try:
                if needle in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                continue
    return found


def _alive_actors_on(node, class_name: str) -> int:
    """Actors whose class name has ``class_name``, ALIVE (constructor done) on one ``cluster_utils``
    node, from the GCS actor table (the state API needs a dashboard, which this cluster has not)."""
    from ray._private import state

    return sum(
        1
        for a in state.actors().values()
        if a["State"] == "ALIVE" and class_name in a["ActorClassName"] and a["Address"]["NodeID"] == node.node_id
    )


@pytest.mark.slow
def test_node_removed_mid_scoring_every_image_exactly_once(ray_node_to_lose, synth_data, model_artifact, tmp_path):
    """Remove the worker node of a 2-node cluster while one model actor runs on it and chunks are
    being committed: the attempt fails, a second attempt re-runs the uncommitted chunks on the head
    node with a pool that fits there, the run completes, and every image is in the output once."""
    cluster, worker = ray_node_to_lose
    # all 300 images: under a loaded machine the worker's actor can take many seconds to start,
    # and the head's actor must not finish everything before
    n = stage_images(synth_data, tmp_path / "imgs", 300)
    out = tmp_path / "scores"
    # actor_cpus 2 on two 2-CPU nodes: one actor per node (with 1, Ray may place both on the head,
    # and then there is no actor to lose); after the loss, the pool that fits is one actor
    cfg = cfg_for(
        model_artifact["uri"],
        str(tmp_path / "imgs"),
        str(out),
        "",
        tmp_path,
        num_actors=2,
        actor_cpus=2.0,
        chunk_size=8,
        batch_size=4,
        block_size=4,
        read_threads=2,
        storage=StorageConfig(),
    )
    removed: dict[str, int] = {}
    stop = threading.Event()

    def remover() -> None:
        while not stop.is_set():
            actors = _node_processes(worker, "Predictor")
            committed = list(out.rglob("*.parquet"))
            # the worker's model actor must be up (ALIVE), so that it holds batches when its node
            # goes: a pool actor still starting there is only dropped, and the attempt then succeeds
            if actors and len(committed) >= 2 and _alive_actors_on(worker, "MapWorker"):
                removed.update(actors=len(actors), committed_before=len(committed))
                cluster.remove_node(worker, allow_graceful=False)
                return
            time.sleep(0.05)

    s = _run_watched(lambda: scoring_run.run(cfg), remover, stop)
    assert removed, "the worker node was never removed mid-run (no actor on it / nothing committed)"
    assert removed["committed_before"] < s["chunks"], (removed, s)  # work was still left to do
    assert (s["listed"], s["scored"], s["failed"]) == (n, n - 1, 1), s
    assert s["attempts"] == 2, s
    uris = query.open_scores(str(out)).to_table()["uri"].to_pylist()
    assert len(uris) == n and len(set(uris)) == n
    assert set(uris) == {str(p) for p in (tmp_path / "imgs").iterdir()}


@pytest.mark.slow
def test_benchmark_load_job_runs(tmp_path):
    """jobs/benchmark_load.py end to end at tiny N (the 10,000 vs 100,000 run is a manual benchmark)."""
    r = run_job(
        ["jobs/benchmark_load.py", "--small", "200", "--n", "600", "--chunk-size", "100", "--workdir", str(tmp_path)],
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    for n in ("200", "600"):
        run = out["runs"][n]
        assert run["scored"] == int(n) and run["chunks"] == int(n) // 100
        assert run["peak_rss_mib"]["driver"] > 50 and run["peak_rss_mib"]["worker_max"] > 50
    assert set(out["peak_ratio_large_over_small"]) >= {"driver", "worker_max", "total"}
