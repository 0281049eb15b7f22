"""Shared fixtures: real services on loopback only (Ray, an S3 server), small image sets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL and sets AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old


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


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """120 synthetic images per class (Negative/Positive), 227 px JPEGs."""
    from crackscale import synth

    return synth.generate(tmp_path_factory.mktemp("synth"), per_class=120, seed=7)


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
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_two_nodes(s3_server):
    """A 2-node ``ray.cluster_utils.Cluster`` (head + one worker node, 2 CPUs each)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_server):
    """A real ``ray start --head`` cluster with token auth, as the README starts it.

    Yields a dict with the dashboard address and the env a client needs for ``ray job submit``.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    dash = free_port()
    tmp = tmp_path_factory.mktemp("rayhead")
    env = dict(os.environ, RAY_AUTH_MODE="token")
    cmd = [str(Path(PY).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
           f"--temp-dir={tmp}"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    client_env = dict(env, RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash}",
                      RAY_ADDRESS=f"http://127.0.0.1:{dash}")
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": client_env}
    finally:
        stop_ray_under(tmp)


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


def run_job(args: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a jobs/ script as a user would (``python jobs/x.py ...``) from the project root."""
    return subprocess.run([PY, *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)


def last_json(stdout: str) -> dict:
    """The JSON summary a job prints as its last line."""
    import json

    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary in output:\n{stdout[-3000:]}")


# ---- scoring fixtures (crackscale.score / query / runtime tests) ---------------------------------

def make_artifact(uri: str, name: str = "test-model", seed: int = 0, image_size: int = 64,
                  threshold: float = 0.5) -> dict:
    """Save an untrained MobileNetV2 (α 0.35, BN calibrated) artifact to ``uri``; returns its model.json."""
    import json as _json

    import tensorflow as tf

    from crackscale import artifact, storage
    from crackscale import model as M
    from crackscale.config import TrainConfig

    from crackscale import runtime

    tf.keras.utils.set_random_seed(seed)
    m, _ = M.build(TrainConfig(weights="none", image_size=image_size, alpha=0.35))
    # Untrained MobileNetV2 in inference mode shrinks activations to ~1e-12 (BN moving stats at
    # their init), so every image scores exactly 0.5. One training-mode pass with BN momentum 0
    # sets each BN's moving statistics to those of a batch of concrete-like images: activations
    # stay O(1) and probabilities differ per image, as pipeline and LiteRT parity tests need.
    bns = [layer for layer in m.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 0.0
    m(tf.constant(runtime.sample_images(image_size, 64, seed=seed), tf.float32), training=True)
    for b, mom in zip(bns, momenta):
        b.momentum = mom
    artifact.save(m, {
        "name": name, "class_names": ["Negative", "Positive"], "crack_class": "Positive",
        "image_size": image_size, "threshold": threshold,
        "preprocessing": f"RGB float32 0..255, {image_size}x{image_size}, tf.image.resize antialias bilinear",
        "metrics": {}, "config": {}, "versions": {},
    }, uri)
    return _json.loads(storage.read_text(storage.join(uri, "model.json")))


@pytest.fixture(scope="session")
def model_artifact(tmp_path_factory) -> dict:
    """A local model artifact (64 px, α 0.35, untrained); dict with uri and meta."""
    uri = str(tmp_path_factory.mktemp("artifact") / "model")
    return {"uri": uri, "meta": make_artifact(uri)}


@pytest.fixture(scope="session")
def model_artifact_v2(tmp_path_factory) -> dict:
    """A second model version (different weights, so a different model_sha256)."""
    uri = str(tmp_path_factory.mktemp("artifact2") / "model")
    return {"uri": uri, "meta": make_artifact(uri, name="test-model", seed=1)}


def small_train_config(data, tmp_path, **overrides):
    """A TrainConfig that learns the synthetic data in well under a minute on 2 cores."""
    from crackscale.config import TrainConfig

    base = dict(data=str(data), weights="none", image_size=96, alpha=0.35, group_size=5,
                batch_size=32, head_epochs=12, head_lr=0.002, fine_tune_epochs=2, bn_momentum=0.7,
                min_epochs=4,
                fine_tune_lr=1e-4, patience=5, storage_path=str(tmp_path / "runs"), name="t")
    base.update(overrides)
    return TrainConfig(**base)
