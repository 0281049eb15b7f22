"""Shared fixtures: real services on loopback only (Ray, an S3 server), small image sets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = ROOT.parent / "shared" / "data" / "concrete-crack"
PY = sys.executable

# Fake credentials for the loopback S3 server; set before anything starts Ray so workers inherit
# them. Never real ones: tests talk to 127.0.0.1 only.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Jobs run by tests start their own local Ray unless a test points them at a cluster: never
# attach to a developer's `ray start` cluster by accident.
os.environ["RAY_ADDRESS"] = "local"


# The longest tests (several minutes each on 2 cores), longest first: pytest-xdist (`make test`:
# --dist load --maxschedchunk 1) hands tests out one at a time in collection order, so starting
# these first keeps one of them from running alone at the end.
LONGEST_FIRST = [
    "test_readme.py::test_readme_tour_as_written",
    "test_readme.py::test_tuning_page_as_written",
    "test_tune.py::test_asha_stops_weak_trials_and_exports_a_best_artifact_that_scores",
    "test_train_jobs.py::test_two_workers_on_two_nodes_learn",
    "test_tune.py::test_interrupted_run_resumes_without_redoing_finished_trials",
    "test_tune.py::test_pbt_exploits_and_reports_the_schedule",
    "test_train.py::test_one_worker_learns_and_writes_a_self_describing_artifact",
    "test_train_jobs.py::test_killed_run_resumes_without_redoing_epochs",
    "test_secrets.py::test_no_secret_in_any_output_or_log",
    "test_train_jobs.py::test_benchmark_train_prints_both_rates",
    "test_score.py::test_s3_incremental_and_new_model",
]


def pytest_collection_modifyitems(session, config, items) -> None:
    """The longest tests first, then the other slow ones, then the rest (stable within each)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item) -> tuple[int, int]:
        name = f"{Path(str(item.fspath)).name}::{item.name}"
        if name in rank:
            return 0, rank[name]
        return (1 if item.get_closest_marker("slow") else 2), 0

    items.sort(key=key)


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this process: the kernel may return a port
    just closed again, and two services of one cluster on one port make ``ray start`` fail."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def private_agent_ports() -> list[str]:
    """``ray start`` flags giving a cluster's per-node services their own ports: other clusters on
    this machine may hold the defaults, and the job API then answers "No available agent to submit
    job"."""
    flags = [
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "ray-client-server-port",
        "node-manager-port",
        "object-manager-port",
    ]
    return [f"--{flag}={free_port()}" for flag in flags]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL and sets AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:  # session scope: no function-scoped monkeypatch
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the test S3 server; yields its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{time.monotonic_ns() % 10**6}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def upload_tree(endpoint: str, local: Path, bucket: str, prefix: str) -> int:
    """Upload every file under ``local`` to s3://bucket/prefix/…; returns the count."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    n = 0
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
            n += 1
    return n


def shared_dir(tmp_path_factory, name: str, make) -> Path:
    """A directory built once per test session, also across pytest-xdist workers.

    ``make(path)`` fills ``path`` (it must not exist yet); the first worker to ask builds it under a
    file lock in the run's shared base temp dir, the others wait and reuse it. Users of a shared
    directory must not change it (copy it first).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-N: common to every worker of this run
    path, done = base / f"shared-{name}", base / f"shared-{name}.done"
    with FileLock(str(base / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """150 synthetic images per class (Negative/Positive), 227 px JPEGs."""
    from crackscale.data import synth

    return shared_dir(tmp_path_factory, "synth", lambda p: synth.generate(p, per_class=150, seed=7))


@pytest.fixture(scope="session")
def photo_set(tmp_path_factory) -> Path:
    """A synthetic photo set with masks: 8 photos of 4 × 3 crops of 227 px (photos/ + masks/)."""
    from crackscale.data import synth

    return shared_dir(tmp_path_factory, "photo-set", lambda p: synth.photo_set(p, n=8, cols=4, rows=3, seed=5))


# What users' file names hold and naive CSV or HTML handling alters: a quote, a comma, non-ASCII, a
# space, a newline. The leading number stays, so the group key (source photo) is the plain file's.
ODD_SUFFIXES = (' quote"d', " comma, here", " é", " new\nline")


@pytest.fixture(scope="session")
def odd_named_data(synth_data, tmp_path_factory) -> Path:
    """``synth_data`` with every third file renamed ``NNNNN<odd suffix>.jpg``."""

    def make(path: Path) -> None:
        for i, src in enumerate(sorted(synth_data.rglob("*.jpg"))):
            name = src.name if i % 3 else f"{src.stem}{ODD_SUFFIXES[(i // 3) % len(ODD_SUFFIXES)]}{src.suffix}"
            (path / src.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / src.parent.name / name)

    return shared_dir(tmp_path_factory, "odd-named", make)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real 6,000-image sample in ../shared/data, when present."""
    if not REAL_DATA.is_dir():
        pytest.skip("real sample ../shared/data/concrete-crack not present (optional)")
    return REAL_DATA


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local Ray with a fixed CPU count (more logical CPUs than cores: tests oversubscribe)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    yield ray
    ray.shutdown()


def _two_node_cluster():
    """Head + one worker node, 2 CPUs each, with this process connected as the driver."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_two_nodes(s3_server):
    """A 2-node ``ray.cluster_utils.Cluster`` (head + one worker node, 2 CPUs each)."""
    for cluster, _ in _two_node_cluster():
        yield cluster


@pytest.fixture
def ray_node_to_lose(s3_server):
    """A fresh 2-node cluster whose worker node a test may remove; yields (cluster, worker node)."""
    yield from _two_node_cluster()


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A real ``ray start --head`` cluster with token auth, as the README starts it.

    Yields a dict with the dashboard address and the env a client needs for ``ray job submit``.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    dash = free_port()
    # a short directory: Ray's unix socket paths under it must stay within 107 bytes (pytest-xdist
    # puts each worker's tmp_path one level deeper, which overflowed them)
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    # as after `source .venv/bin/activate`: the job's `python` must be the venv's
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [
        str(Path(PY).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=4",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--disable-usage-stats",
        f"--temp-dir={tmp}",
        *private_agent_ports(),
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    client_env = dict(env, RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash}", RAY_ADDRESS=f"http://127.0.0.1:{dash}")
    # the job agent comes up after `ray start` returns ("No available agent to submit job"):
    # wait until the head accepts job API calls, as a user would by retrying
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run(
            [str(Path(PY).parent / "ray"), "job", "submit", "--", "true"],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if probe.returncode == 0:
            break
        time.sleep(2)
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": client_env}
    finally:
        stop_ray_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def stop_ray_under(temp_dir: Path) -> None:
    """Stop only the Ray processes of the cluster whose --temp-dir is ``temp_dir``.

    ``ray stop`` would kill every Ray on the machine (other tests' clusters included). The head's
    daemons carry their session dir on the command line; workers exit with their raylet.
    """
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()


def run_job(args: list[str], env: dict | None = None, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run a jobs/ script as a user would (``python jobs/x.py ...``) from the project root."""
    return subprocess.run(
        [PY, *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout
    )


def last_json(stdout: str) -> dict:
    """The JSON summary a job prints as its last line."""
    import json

    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary in output:\n{stdout[-3000:]}")


# ---- scoring fixtures (crackscale.scoring / query / runtimes tests) ------------------------------


def make_artifact(
    uri: str, name: str = "test-model", seed: int = 0, image_size: int = 64, threshold: float = 0.5
) -> dict:
    """Save an untrained MobileNetV2 (α 0.35, BN calibrated) artifact to ``uri``; returns its model.json."""
    import json as _json

    import tensorflow as tf

    from crackscale import artifact, storage
    from crackscale import model as M
    from crackscale.config.train import TrainConfig
    from crackscale.runtimes import litert

    tf.keras.utils.set_random_seed(seed)
    # every augmentation layer on: exports (LiteRT fp32/int8) must pass them through at inference
    augment = dict(flip_vertical=True, brightness=0.1, contrast=0.1)
    m, _ = M.build(TrainConfig(weights="none", image_size=image_size, alpha=0.35, **augment))
    # Untrained MobileNetV2 in inference mode shrinks activations to ~1e-12 (BN moving stats at
    # their init), so every image scores exactly 0.5. One training-mode pass with BN momentum 0
    # sets each BN's moving statistics to those of a batch of concrete-like images: activations
    # stay O(1) and probabilities differ per image, as pipeline and LiteRT parity tests need.
    bns = [layer for layer in m.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 0.0
    m(tf.constant(litert.sample_images(image_size, 64, seed=seed), tf.float32), training=True)
    for b, mom in zip(bns, momenta):
        b.momentum = mom
    artifact.save(
        m,
        {
            "name": name,
            "class_names": ["Negative", "Positive"],
            "crack_class": "Positive",
            "image_size": image_size,
            "threshold": threshold,
            "resize_antialias": False,
            "preprocessing": f"RGB float32 0..255, {image_size}x{image_size}, tf.image.resize bilinear",
            "metrics": {},
            "config": {},
            "versions": {},
        },
        uri,
    )
    return _json.loads(storage.read_text(storage.join(uri, "model.json")))


def _shared_artifact(tmp_path_factory, key: str, **kwargs) -> dict:
    import json as _json

    uri = str(shared_dir(tmp_path_factory, key, lambda p: make_artifact(str(p / "model"), **kwargs)) / "model")
    return {"uri": uri, "meta": _json.loads(Path(uri, "model.json").read_text())}


@pytest.fixture(scope="session")
def model_artifact(tmp_path_factory) -> dict:
    """A local model artifact (64 px, α 0.35, untrained); dict with uri and meta. Don't modify it."""
    return _shared_artifact(tmp_path_factory, "artifact")


@pytest.fixture(scope="session")
def model_artifact_v2(tmp_path_factory) -> dict:
    """A second model version (different weights, so a different model_sha256)."""
    return _shared_artifact(tmp_path_factory, "artifact2", name="test-model", seed=1)


def small_train_config(data, tmp_path, **overrides):
    """A TrainConfig that learns the synthetic data in well under a minute on 2 cores."""
    from crackscale.config.train import TrainConfig

    base = dict(
        data=str(data),
        weights="none",
        image_size=96,
        alpha=0.35,
        group_size=5,
        batch_size=32,
        head_epochs=12,
        head_lr=0.002,
        fine_tune_epochs=2,
        bn_momentum=0.7,
        min_epochs=4,
        fine_tune_lr=1e-4,
        patience=5,
        storage_path=str(tmp_path / "runs"),
        name="t",
        int8=False,  # the int8 export is checked on the shared trained_run
    )
    base.update(overrides)
    return TrainConfig(**base)


def check_learned(summary: dict, meta: dict) -> None:
    """A training run learned: held-out test split well above chance and better than before training.

    The decision threshold favours recall, so accuracy is judged at 0.5 and threshold-free."""
    assert summary["test"]["accuracy_at_0.5"] >= 0.8, summary
    assert summary["test"]["roc_auc"] >= 0.9, summary
    assert summary["test"]["recall"] >= 0.9, summary
    before = summary["test_before"]["roc_auc"]
    assert before != before or summary["test"]["roc_auc"] > before  # NaN: one class predicted before
    losses = [h["loss"] for h in meta["history"]]
    assert min(losses[-3:]) < losses[0], losses


@pytest.fixture(scope="session")
def trained_run(odd_named_data, tmp_path_factory) -> dict:
    """One real training run, shared by every test that needs a trained model (don't modify it).

    ``jobs/train.py`` with ``small_train_config(name="one")`` (1 worker, its own local Ray) on
    ``odd_named_data``, run once per test session; dict with ``cfg`` (the TrainConfig),
    ``summary`` (the job's JSON) and ``artifact`` (the model directory).
    """
    import json as _json

    from crackscale.config.loader import dump

    def make(path: Path) -> None:
        path.mkdir(parents=True)
        cfg = small_train_config(odd_named_data, path, name="one", int8=True)
        (path / "train.yaml").write_text(dump(cfg))
        r = run_job(["jobs/train.py", "--config", str(path / "train.yaml")])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        (path / "summary.json").write_text(_json.dumps(last_json(r.stdout)))

    path = shared_dir(tmp_path_factory, "trained", make)
    return {
        "cfg": small_train_config(odd_named_data, path, name="one", int8=True),
        "summary": _json.loads((path / "summary.json").read_text()),
        "artifact": path / "runs" / "one" / "model",
    }


# ---- tuning fixtures (crackscale.tuning tests) --------------------------------------------------


def small_tune_config(data, tmp_path, **overrides):
    """A TuneConfig whose trials are tiny training runs (64 px, α 0.35, 60 images per class, 1 worker)."""
    from crackscale.config.loader import from_dict
    from crackscale.config.tune import TuneConfig

    train = dict(
        data=str(data),
        weights="none",
        image_size=64,
        alpha=0.35,
        group_size=5,
        batch_size=32,
        head_epochs=4,
        head_lr=0.002,
        fine_tune_epochs=1,
        fine_tune_lr=1e-4,
        bn_momentum=0.7,
        min_epochs=2,
        patience=5,
        limit_per_class=60,
        int8=False,
    )
    train.update(overrides.pop("train", {}))
    base = dict(
        train=train,
        scheduler="asha",
        num_samples=4,
        max_concurrent=2,
        grace_period=1,
        reduction_factor=4,
        perturbation_interval=1,
        pbt_quantile=0.5,
        keep_top_k=2,
        storage_path=str(tmp_path / "tune"),
        name="t",
        search_space={"head_lr": {"loguniform": [1e-4, 3e-2]}, "dropout": {"uniform": [0.1, 0.5]}},
    )
    base.update(overrides)
    return from_dict(TuneConfig, base)


# ---- reliability fixtures (tests/test_faults.py, test_hostile_input.py, test_secrets.py) ---------


class FaultyS3Proxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of the test S3 server that injects faults.

    ``rate`` of requests (matching ``match``, a predicate on (method, path)) get a fault instead
    of being forwarded: ``503 SlowDown`` XML, ``500 InternalError`` XML, or a TCP reset, in turn.
    ``max_consecutive`` caps back-to-back faults on one (method, path), so a client that retries
    (with backoff) always gets through: set it to 0 for an endpoint that never recovers. ``mode``
    ``"deny"`` answers every request 403 AccessDenied. ``fail_first``: the first attempt of every
    distinct (method, path) fails too, so every kind of request must be retried at least once.
    ``latency``: seconds each forwarded request waits first (a remote endpoint's round trip).
    ``drop_put_answers``: the first that many PUTs of ``part-`` files are forwarded (the server
    stores them) and then answered with a TCP reset instead of the server's answer.
    ``expire_after``: after that many object GETs under ``images/``, every such GET is answered
    400 ExpiredToken (credentials that expire mid-run; set it to None to renew them).
    Counters: ``faults``, ``faulted_requests``, ``forwarded``, ``paths`` (forwarded, in order) and
    ``max_in_flight`` (the most requests it served at once).
    """

    ERRORS = {
        "slowdown": (503, "SlowDown", "Please reduce your request rate."),
        "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
        "deny": (403, "AccessDenied", "Access Denied"),
        "expired": (400, "ExpiredToken", "The provided token has expired."),
    }

    def __init__(
        self,
        upstream: str,
        rate: float = 0.25,
        max_consecutive: int = 2,
        seed: int = 0,
        match=None,
        mode: str = "mixed",
        fail_first: bool = False,
        latency: float = 0.0,
        expire_after: int | None = None,
        drop_put_answers: int = 0,
    ) -> None:
        import http.server
        import random
        import threading

        self.upstream = upstream.split("://", 1)[1]
        self.rate, self.max_consecutive, self.mode = rate, max_consecutive, mode
        self.fail_first, self.latency = fail_first, latency
        self.expire_after, self.image_gets = expire_after, 0
        self.drop_put_answers, self.dropped = drop_put_answers, []
        self.paths: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self._seen: set[tuple[str, str]] = set()
        self.match = match or (lambda method, path: True)
        self.faults: dict[str, int] = {}
        self.faulted_requests: list[tuple[str, str]] = []
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._streak: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._kinds = ["slowdown", "reset", "internal"]
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                if self.headers.get("Expect", "").lower() == "100-continue":
                    self.send_response_only(100)
                    self.end_headers()
                body = self._body()
                kind = proxy._decide(self.command, self.path)
                if kind == "reset":
                    import socket
                    import struct

                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind:
                    status, code, msg = proxy.ERRORS[kind]
                    xml = (
                        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{msg}</Message><RequestId>fault</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                import http.client

                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    time.sleep(proxy.latency)
                    conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("expect", "transfer-encoding", "connection")
                    }
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1
                with proxy._lock:
                    drop = (
                        self.command == "PUT" and "part-" in self.path and len(proxy.dropped) < proxy.drop_put_answers
                    )
                    if drop:
                        proxy.dropped.append(self.path)
                if drop:  # stored upstream; the client never hears so
                    import socket
                    import struct

                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                with proxy._lock:
                    proxy.forwarded += 1
                    proxy.paths.append(self.path)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # resets are on purpose
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            image_get = method == "GET" and "/images/" in path and "list-type" not in path
            self.image_gets += image_get
            if self.expire_after is not None and image_get and self.image_gets > self.expire_after:
                kind = "expired"
            elif self.mode == "deny":
                kind = "deny"
            else:
                key = (method, path)
                streak = self._streak.get(key, 0)
                capped = self.max_consecutive and streak >= self.max_consecutive
                first = self.fail_first and key not in self._seen
                self._seen.add(key)
                if not self.match(method, path) or capped or (not first and self._rng.random() >= self.rate):
                    self._streak[key] = 0
                    return ""
                self._streak[key] = streak + 1
                kind = self._kinds[sum(self.faults.values()) % len(self._kinds)]
            self.faults[kind] = self.faults.get(kind, 0) + 1
            self.faulted_requests.append((method, path))
            return kind

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def faulty_s3(s3_server):
    """Factory of FaultyS3Proxy objects in front of the test S3 server; all closed afterwards."""
    made = []

    def make(**kwargs) -> FaultyS3Proxy:
        made.append(FaultyS3Proxy(s3_server, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def ray_tune_local(s3_server):
    """Like ``ray_local`` (4 CPUs) plus a dashboard that Train V2's PlacementGroupCleaner can reach.

    Tune stops trials (ASHA) and restarts them (PBT exploit) by killing their actors; Train V2 then
    frees the trial's worker placement group from a cleaner actor that asks the state API (the
    dashboard) whether the controller is alive. With several Ray instances on one machine it cannot
    auto-detect which one, fails, and the placement group leaks (its CPUs stay taken). Naming the
    dashboard in the environment the raylet and its workers inherit avoids that.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=True,
            runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
        )
        yield ray
        ray.shutdown()


def job_env() -> dict:
    return dict(os.environ, RAY_ADDRESS="local")  # a fresh local Ray, never someone else's cluster


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started (its local Ray), by pid."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    os.kill(proc.pid, signal.SIGKILL)
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
