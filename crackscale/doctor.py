"""``crackscale doctor``: is this environment ready to train and score? Says what to fix.

Checks, each OK / WARN / FAIL / SKIP with a fix: Python version; installed packages against the
pins of this package (tf-keras must match TensorFlow's minor version); TensorFlow imports and
which GPUs it sees; JPEGs decode without TensorFlow to TensorFlow's pixels (``crackscale.imaging.jpeg``);
the Ray cluster is reachable (GCS ``host:port`` or the dashboard/job server
``http://host:8265``, whose token auth is recognised); the S3 endpoint answers and the credentials
are accepted (and the bucket exists, with ``--bucket``). Exit status 1 when anything failed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.imaging import jpeg

TIMEOUT_S = 5.0


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


def check_python() -> Check:
    v = sys.version_info
    if (v.major, v.minor) == (3, 11):
        return Check("python", "ok", platform.python_version())
    return Check(
        "python",
        "fail",
        platform.python_version(),
        "use Python 3.11 (TensorFlow 2.21 + Ray 2.60 are pinned and tested on it): python3.11 -m venv .venv",
    )


def check_packages() -> list[Check]:
    """Installed versions against the requirements this package was installed with."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in md.requires("crackscale") or []]
    except md.PackageNotFoundError:
        return [Check("packages", "fail", "crackscale is not installed", "pip install -e .  (in the checkout)")]
    out, missing = [], []
    for r in reqs:
        if r.marker and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(r.name)
        except md.PackageNotFoundError:
            missing.append(r.name)
            continue
        if not r.specifier.contains(have, prereleases=True):
            out.append(
                Check(
                    f"package {r.name}", "warn", f"{have} installed, {r} pinned", f"pip install '{r.name}{r.specifier}'"
                )
            )
    if missing:
        out.append(Check("packages", "fail", "missing: " + ", ".join(missing), "pip install -e .  (in the checkout)"))
    try:
        tf_v = next(md.version(n) for n in ("tensorflow", "tensorflow-cpu") if _installed(n))
        tfk_v = md.version("tf-keras")
        if tf_v.split(".")[:2] != tfk_v.split(".")[:2]:
            out.append(
                Check(
                    "tf-keras",
                    "fail",
                    f"tf-keras {tfk_v} with TensorFlow {tf_v}",
                    f"pip install 'tf-keras=={'.'.join(tf_v.split('.')[:2])}.*' (must match TensorFlow)",
                )
            )
    except (StopIteration, md.PackageNotFoundError):
        pass  # reported as missing above
    versions = ", ".join(f"{n} {md.version(n)}" for n in ("ray", "tf-keras", "pyarrow", "duckdb") if _installed(n))
    return [Check("packages", "ok" if not out else "warn", versions)] + out


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def check_tensorflow() -> list[Check]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return [Check("tensorflow", "fail", f"import failed: {e}", "pip install -e .  (TensorFlow 2.21)")]
    gpus = tf.config.list_physical_devices("GPU")
    checks = [Check("tensorflow", "ok", tf.__version__)]
    driver = shutil.which("nvidia-smi") is not None
    if gpus:
        checks.append(Check("gpus", "ok", f"{len(gpus)} visible to TensorFlow: " + ", ".join(g.name for g in gpus)))
    elif driver:
        checks.append(
            Check(
                "gpus",
                "fail",
                "nvidia-smi is present but TensorFlow sees no GPU",
                "install the CUDA build: pip install -e '.[gpu]' (tensorflow[and-cuda]==2.21.0)",
            )
        )
    else:
        checks.append(
            Check(
                "gpus",
                "warn",
                "no GPU visible: CPU only",
                "fine with use_gpu: false; for GPUs run on a node with NVIDIA drivers and .[gpu]",
            )
        )
    return checks


def _tcp(host: str, port: int) -> str:
    """'' if host:port accepts a TCP connection, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return ""
    except OSError as e:
        return e.strerror or str(e)


def check_ray(address: str) -> Check:
    """Reach the cluster at ``address`` (GCS host:port or dashboard http(s)://host:port)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address in ("", "local"):
        return Check(
            "ray cluster",
            "warn",
            "no cluster address (RAY_ADDRESS unset or 'local'): jobs start a local Ray",
            "for a cluster: `ray start --head` on the head node, then --ray-address / RAY_ADDRESS=host:6379",
        )
    if address.startswith(("http://", "https://")):
        return _check_dashboard(address)
    host, _, port = address.rpartition(":") if address != "auto" else ("", "", "")
    if host and port.isdigit() and (why := _tcp(host, int(port))):
        return Check(
            "ray cluster",
            "fail",
            f"cannot reach Ray at {address}: {why}",
            "start the cluster (`ray start --head`) or fix --ray-address / RAY_ADDRESS",
        )
    code = (
        "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
        "r = ray.cluster_resources(); n = sum(1 for x in ray.nodes() if x['Alive']); "
        "print(json.dumps({'nodes': n, 'CPU': r.get('CPU', 0), 'GPU': r.get('GPU', 0)}))" % address
    )
    try:
        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, RAY_ADDRESS=address),
        )
    except subprocess.TimeoutExpired:
        return Check(
            "ray cluster",
            "fail",
            f"connecting to Ray at {address} timed out (60 s)",
            "check the address and that the head node's GCS port is open to this machine",
        )
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["unknown error"])[-1]
        fix = (
            "send the cluster's token: RAY_AUTH_MODE=token (token in ~/.ray/auth_token)"
            if "auth" in last.lower()
            else "check the address; the cluster's Ray and Python versions must match"
        )
        return Check("ray cluster", "fail", f"ray.init({address!r}) failed: {last[:300]}", fix)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return Check("ray cluster", "ok", f"{address}: {r['nodes']} node(s), {r['CPU']:g} CPUs, {r['GPU']:g} GPUs")


def _check_dashboard(address: str) -> Check:
    import urllib.error
    import urllib.request

    url = address.rstrip("/") + "/api/version"
    headers = {}
    token_file = os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_MODE") == "token" and os.path.isfile(token_file):
        headers["Authorization"] = "Bearer " + open(token_file).read().strip()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as r:
            info = json.loads(r.read().decode() or "{}")
        return Check("ray cluster", "ok", f"job server {address}, Ray {info.get('ray_version', '?')}")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return Check(
                "ray cluster",
                "fail",
                f"job server {address} refused the request ({e.code}): token auth",
                "RAY_AUTH_MODE=token with the cluster's ~/.ray/auth_token (or RAY_AUTH_TOKEN)",
            )
        return Check(
            "ray cluster", "fail", f"job server {address}: HTTP {e.code}", "is this the dashboard port (8265)?"
        )
    except (urllib.error.URLError, OSError) as e:
        return Check(
            "ray cluster",
            "fail",
            f"cannot reach the job server {address}: {getattr(e, 'reason', e)}",
            "start the cluster (`ray start --head --dashboard-host 0.0.0.0`) or fix the address",
        )


def check_s3(cfg: StorageConfig, bucket: str) -> Check:
    """Credentials present, endpoint answering, credentials accepted, bucket there (with ``bucket``)."""
    import boto3
    import botocore.config
    import botocore.exceptions

    s = storage.S3Settings.resolve(cfg)
    bucket = bucket[len("s3://") :].split("/", 1)[0] if bucket.startswith("s3://") else bucket
    if not s.endpoint and not bucket:
        return Check("s3", "skip", "no S3 endpoint (AWS_ENDPOINT_URL / --s3-endpoint) and no --bucket given")
    where = s.describe()
    session = boto3.Session()
    if session.get_credentials() is None:
        return Check(
            "s3",
            "fail",
            f"no AWS credentials found for {where}",
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an instance role",
        )
    client = session.client(
        "s3",
        endpoint_url=s.endpoint or None,
        region_name=s.region,
        config=botocore.config.Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1}),
    )
    try:
        if bucket:
            client.head_bucket(Bucket=bucket)
        else:
            client.list_buckets()
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectTimeoutError,
        botocore.exceptions.ReadTimeoutError,
    ) as e:
        return Check(
            "s3",
            "fail",
            f"cannot reach S3 endpoint {where}: {e}",
            "check --s3-endpoint / storage.s3_endpoint / AWS_ENDPOINT_URL and that the server is up",
        )
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return Check("s3", "fail", f"bucket {bucket} not found at {where}", "create it or fix the bucket name")
        return Check(
            "s3",
            "fail",
            f"{where} refused the credentials ({code or e})",
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile) and the bucket policy",
        )
    except botocore.exceptions.BotoCoreError as e:
        return Check("s3", "fail", f"S3 at {where}: {e}", "check the endpoint URL (http(s)://host:port)")
    return Check("s3", "ok", f"{where}: credentials accepted" + (f", bucket {bucket} exists" if bucket else ""))


def check_jpeg() -> Check:
    """Scoring actors decode JPEGs without TensorFlow only where the check image gives its pixels."""
    try:
        bad = jpeg.mismatches()
    except Exception as e:  # noqa: BLE001 - a missing or broken library is the finding
        return Check(
            "jpeg decoder",
            "warn",
            f"unavailable ({type(e).__name__}: {e}): scoring decodes with TensorFlow",
            "pip install -e .  (simplejpeg and numba, as pinned)",
        )
    if bad:
        return Check(
            "jpeg decoder",
            "warn",
            f"other pixels than TensorFlow's (sizes {bad}): scoring decodes with TensorFlow",
            "install the pinned simplejpeg and numba wheels, or set decoder: tf to silence",
        )
    return Check("jpeg decoder", "ok", "JPEGs decode without TensorFlow, to its pixels (checked)")


def run(ray_address: str = "", cfg: StorageConfig | None = None, bucket: str = "") -> list[Check]:
    """All checks; the slow ones (TensorFlow import, Ray connect) run concurrently."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        ray_f = pool.submit(check_ray, ray_address)
        s3_f = pool.submit(check_s3, cfg or StorageConfig(), bucket)
        tf_checks = check_tensorflow()
        return [check_python(), *check_packages(), *tf_checks, check_jpeg(), ray_f.result(), s3_f.result()]


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():5} {c.name:18} {c.detail}")
        if c.fix and c.status in ("fail", "warn"):
            lines.append(f"{'':5} {'':18} → {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    lines.append(f"{failed} problem(s) to fix" if failed else "ready")
    return "\n".join(lines)
