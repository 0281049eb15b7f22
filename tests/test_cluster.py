"""cluster/: configs agree with cluster/versions.yaml and pyproject.toml, pass Ray's and KubeRay's
own rules, point at files that exist; the local script really starts, runs a job, and stops."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import PY, ROOT, free_port, private_agent_ports

CLUSTER = ROOT / "cluster"
VERSIONS = yaml.safe_load((CLUSTER / "versions.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
AWS_FILES = sorted((CLUSTER / "aws").glob("*.yaml"))
K8S_FILES = sorted((CLUSTER / "kubernetes").glob("*.yaml"))
SCRIPT = CLUSTER / "local" / "cluster.sh"
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"}


def _pins() -> dict[str, str]:
    """name -> exact version for every ``name[extras]==version`` requirement in pyproject.toml."""
    reqs = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        reqs += extra
    pins: dict[str, str] = {}
    for req in reqs:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", req)
        if m:
            pins.setdefault(m.group(1).lower(), m.group(3))
    return pins


def _job_script(argv: list[str]) -> tuple[str, str | None]:
    """(script, --config value) of a ``python jobs/x.py --config f ...`` command line."""
    i = argv.index("python")
    script = argv[i + 1]
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    return script, config


def _assert_job_command(argv: list[str], expected_script: str) -> None:
    script, config = _job_script(argv)
    assert script == expected_script
    assert (ROOT / script).is_file(), f"{script} does not exist"
    assert config is not None, f"{script} is run without --config"
    assert (ROOT / config).is_file(), f"{config} does not exist"
    for i, arg in enumerate(argv):
        if arg == "--set":
            assert re.fullmatch(r"[a-z_][a-z0-9_.]*=\S+", argv[i + 1]), argv[i + 1]


# ----------------------------------------------------------------------------- versions
def test_versions_file_agrees_with_pyproject():
    pins = _pins()
    assert str(VERSIONS["crackscale"]) == PYPROJECT["project"]["version"]
    assert pins["ray"] == VERSIONS["ray"]
    assert pins["tensorflow"] == VERSIONS["tensorflow"]
    assert pins["tensorflow-cpu"] == VERSIONS["tensorflow"]
    assert pins["tf-keras"] == VERSIONS["tf_keras"]
    # tf-keras must match TensorFlow's minor version exactly.
    assert VERSIONS["tf_keras"].split(".")[:2] == VERSIONS["tensorflow"].split(".")[:2]
    major, minor = (int(x) for x in str(VERSIONS["python"]).split("."))
    spec = PYPROJECT["project"]["requires-python"]
    lo = re.search(r">=\s*(\d+)\.(\d+)", spec)
    hi = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert lo and (major, minor) >= (int(lo.group(1)), int(lo.group(2))), spec
    assert hi and (major, minor) < (int(hi.group(1)), int(hi.group(2))), spec


def test_image_tags_follow_versions():
    py = "py" + str(VERSIONS["python"]).replace(".", "")
    images = VERSIONS["images"]
    assert images["ray_gpu"] == f"rayproject/ray:{VERSIONS['ray']}-{py}-gpu"
    assert images["ray_cpu"] == f"rayproject/ray:{VERSIONS['ray']}-{py}-cpu"
    assert images["crackscale_gpu"].endswith(f"/crackscale:{VERSIONS['crackscale']}-ray{VERSIONS['ray']}-{py}-gpu")
    assert VERSIONS["code_uri"].endswith(f"/v{VERSIONS['crackscale']}.zip")
    # The frozen ray-ml images must not come back anywhere.
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".sh", ""}:
            assert "rayproject/ray-ml:" not in path.read_text(), path


def test_installed_ray_is_the_pinned_one():
    import ray

    assert ray.__version__ == VERSIONS["ray"]


def _assert_install_commands(text: str, where: str) -> None:
    """Both node-install paths (AWS setup_commands, Dockerfile) install the same versions."""
    assert f'"crackscale[gpu] @ {VERSIONS["code_uri"]}"' in text or "crackscale[gpu] @ ${CODE_URI}" in text, where
    assert f'"tensorflow[and-cuda]=={VERSIONS["tensorflow"]}"' in text, where
    assert f'"tf-keras=={VERSIONS["tf_keras"]}"' in text, where
    assert "pip uninstall -y tensorflow-cpu" in text, where
    assert f"ray.__version__ == '{VERSIONS['ray']}'" in text, where
    assert f"tf.__version__ == '{VERSIONS['tensorflow']}'" in text, where


def test_dockerfile_pins_versions():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [VERSIONS["images"]["ray_gpu"]]
    assert f"ARG CODE_URI={VERSIONS['code_uri']}" in text
    _assert_install_commands(text, "Dockerfile")
    assert VERSIONS["images"]["crackscale_gpu"] in text  # the build command in the header


# ----------------------------------------------------------------------------- AWS
@pytest.mark.parametrize("path", AWS_FILES, ids=lambda p: p.name)
def test_aws_config_passes_ray_validation(path):
    """What `ray up` does before it talks to AWS: prepare_config (defaults, merged setup commands,
    docker checks, per-type bounds) and validate_config (ray-schema.json + cross-field rules)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)

    assert prepared["provider"]["type"] == "aws"
    assert prepared["docker"]["image"] == VERSIONS["images"]["ray_gpu"]
    assert "head_image" not in prepared["docker"] and "worker_image" not in prepared["docker"]
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2, "want at least two GPU node types"
    families = {v["node_config"]["InstanceType"].split(".")[0] for v in gpu_types.values()}
    assert families & {"g5", "g6", "p4d", "p5"}, families
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
        # GPU sizing: at least 6 CPUs per GPU for S3 reads + JPEG decode.
        assert t["resources"]["CPU"] / t["resources"]["GPU"] >= 6, name
        assert t["node_config"].get("ImageId"), f"{name}: set an AMI with NVIDIA drivers + Docker"

    # Setup installs crackscale and TensorFlow at the pinned versions on every node.
    setup = "\n".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    _assert_install_commands(setup, path.name)
    # Token auth on everywhere; dashboard only on the head's loopback (reach it via `ray dashboard`).
    head_start = " ".join(prepared["head_start_ray_commands"])
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "~/.ray/auth_token" in prepared["file_mounts"]


def test_ray_validation_is_not_a_rubber_stamp():
    """The same validator rejects the config once a required field is broken."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(AWS_FILES[0].read_text())
    bad = copy.deepcopy(raw)
    next(t for t in bad["available_node_types"].values() if t["resources"].get("GPU"))["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


# ----------------------------------------------------------------------------- Kubernetes
def _k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _cluster_specs(doc: dict) -> list[dict]:
    kind = doc["kind"]
    if kind == "RayCluster":
        return [doc["spec"]]
    if kind == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    if kind == "RayCronJob":
        return [doc["spec"]["jobTemplate"]["rayClusterSpec"]]
    return []


def _containers(doc: dict) -> list[dict]:
    out = []
    for spec in _cluster_specs(doc):
        out += spec["headGroupSpec"]["template"]["spec"]["containers"]
        for group in spec["workerGroupSpecs"]:
            out += group["template"]["spec"]["containers"]
    if doc["kind"] == "CronJob":
        out += doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return out


def test_kubernetes_manifests_cover_the_scope():
    kinds = sorted(doc["kind"] for _, doc in _k8s_docs())
    assert kinds == ["CronJob", "RayCluster", "RayCronJob", "RayJob"]
    for name, doc in _k8s_docs():
        expected = "batch/v1" if doc["kind"] == "CronJob" else "ray.io/v1"
        assert doc["apiVersion"] == expected, name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name


@pytest.mark.parametrize("name,doc", _k8s_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_cluster_specs(name, doc):
    for spec in _cluster_specs(doc):
        assert spec["rayVersion"] == VERSIONS["ray"], name
        assert spec["authOptions"]["mode"] == "token", name
        head = spec["headGroupSpec"]
        assert "rayStartParams" in head and head["template"]["spec"]["containers"], name
        assert "dashboard-host" not in head["rayStartParams"], "KubeRay sets it; expose via port-forward"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert spec["workerGroupSpecs"], name
        for group in spec["workerGroupSpecs"]:
            assert re.fullmatch(r"[a-z0-9-]+", group["groupName"]), name
            assert "rayStartParams" in group and group["template"]["spec"]["containers"], name
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus = int(limits["nvidia.com/gpu"])
            assert gpus >= 1, f"{name}/{group['groupName']} is not a GPU group"
            assert int(limits["cpu"]) / gpus >= 6, f"{name}/{group['groupName']}: decode CPUs per GPU"
            assert limits == group["template"]["spec"]["containers"][0]["resources"]["requests"]


@pytest.mark.parametrize("name,doc", _k8s_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_images_and_secrets(name, doc):
    containers = _containers(doc)
    assert containers, name
    for c in containers:
        assert c["image"] == VERSIONS["images"]["crackscale_gpu"], f"{name}/{c['name']}"
        for env in c.get("env", []):
            if env["name"] in S3_ENV | {"RAY_AUTH_TOKEN"}:
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']} inline"
        if doc["kind"] != "CronJob":  # Ray pods read S3 settings from the Secret
            assert {"secretRef": {"name": "crackscale-s3"}} in c.get("envFrom", []), f"{name}/{c['name']}"
            assert {"name": "TF_USE_LEGACY_KERAS", "value": "1"} in c["env"]
    text = (CLUSTER / "kubernetes" / name).read_text()
    for var in S3_ENV:
        assert not re.search(rf"{var}\s*[:=]\s*\S", text), f"{name}: {var} set inline"


def _check_runtime_env(renv: dict, name: str) -> None:
    assert renv["working_dir"] == VERSIONS["code_uri"], name
    assert renv["env_vars"]["TF_USE_LEGACY_KERAS"] == "1", name
    assert not S3_ENV & set(renv["env_vars"]), f"{name}: credentials in runtime_env"


def _check_rayjob_spec(spec: dict, name: str, script: str) -> None:
    _assert_job_command(shlex.split(spec["entrypoint"]), script)
    _check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]), name)
    assert spec["shutdownAfterJobFinishes"] is True, name
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def test_rayjob_train():
    ((name, doc),) = [(n, d) for n, d in _k8s_docs() if d["kind"] == "RayJob"]
    _check_rayjob_spec(doc["spec"], name, "jobs/train.py")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert "num_workers=0" in argv and "use_gpu=true" in argv
    # num_workers=0 counts GPU nodes at start: the job's cluster must not scale from zero.
    for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] >= 1


def test_nightly_scoring_schedules():
    docs = {d["kind"]: (n, d) for n, d in _k8s_docs()}
    name, cron = docs["RayCronJob"]
    assert set(cron["spec"]) <= {"schedule", "jobTemplate", "suspend"}, "fields of KubeRay 1.6 RayCronJob"
    assert len(cron["spec"]["schedule"].split()) == 5
    _check_rayjob_spec(cron["spec"]["jobTemplate"], name, "jobs/score.py")
    argv = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
    assert "use_gpu=true" in argv and "num_actors=0" in argv
    for flag in ("--model", "--input", "--output"):
        assert argv[argv.index(flag) + 1].startswith("s3://"), flag

    name, plain = docs["CronJob"]
    spec = plain["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    argv = c["command"] + c["args"]
    assert argv[:3] == ["ray", "job", "submit"] and "--no-wait" not in argv
    _assert_job_command(argv[argv.index("--") + 1 :], "jobs/score.py")
    assert "use_gpu=true" in argv
    _check_runtime_env(json.loads(argv[argv.index("--runtime-env-json") + 1]), name)
    env = {e["name"]: e for e in c["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    # The submitter talks to the head Service of the RayCluster in raycluster.yaml, with its token.
    (cluster,) = [d for _, d in _k8s_docs() if d["kind"] == "RayCluster"]
    assert env["RAY_API_SERVER_ADDRESS"]["value"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": cluster["spec"]["authOptions"]["secretName"],
        "key": "auth_token",
    }


# ----------------------------------------------------------------------------- docs
def test_readme_covers_every_file_and_topic():
    text = (CLUSTER / "README.md").read_text()
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and path.name != "README.md":
            assert path.relative_to(CLUSTER).as_posix() in text, f"README does not mention {path}"
    for topic in (
        "MinIO",
        "AWS_ENDPOINT_URL",
        "num_workers: 0",
        "num_actors: 0",
        "RayCronJob",
        "RAY_AUTH_MODE=token",
        "127.0.0.1",
        "port-forward",
        "Cost",
        "CPUs per GPU",
    ):
        assert topic in text, topic
    # The client command the README gives is the one verified to work with token auth.
    assert "RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir ." in text


# ----------------------------------------------------------------------------- local cluster
def _script(cmd: list[str], env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *cmd], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.slow
def test_local_script_starts_runs_a_job_and_stops(tmp_path_factory):
    ray_port, dash_port = free_port(), free_port()
    # A short directory: Ray's unix socket paths under it must stay within 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # not tmp_path: deeper under xdist
    env = dict(
        os.environ,
        RAY=str(Path(PY).parent / "ray"),
        RAY_PORT=str(ray_port),
        DASHBOARD_PORT=str(dash_port),
        NUM_CPUS="2",
        TEMP_DIR=str(temp_dir),
    )
    env.pop("RAY_ADDRESS", None)
    # Own ports for every per-node service, so this cluster can't collide with another on the machine.
    extra = ["--", *private_agent_ports()]
    try:
        up = _script(["up", *extra], env)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"http://127.0.0.1:{dash_port}" in up.stdout
        # a second `up` on the same port is refused and leaves the running cluster alone
        again = _script(["up", *extra], env)
        assert again.returncode == 2 and f"already runs with its GCS on port {ray_port}" in again.stderr, again.stderr
        # The dashboard listens on loopback only.
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{dash_port}"], capture_output=True, text=True)
        if listening.returncode == 0 and listening.stdout.strip():
            assert all(line.split()[3].startswith("127.0.0.1:") for line in listening.stdout.strip().splitlines())

        sub = _script(
            [
                "submit",
                "--",
                "python",
                "-c",
                "import os, crackscale, ray; ray.init(); r = ray.cluster_resources(); "
                "print('CRACKSCALE_OK', int(r['CPU']), os.environ['TF_USE_LEGACY_KERAS'])",
            ],
            env,
        )
        out = sub.stdout + sub.stderr
        assert sub.returncode == 0, out[-4000:]
        assert re.search(r"Job 'raysubmit_\w+' succeeded", out) and "CRACKSCALE_OK 2 1" in out, out[-4000:]

        # Token auth is on: a client that sends no token is refused.
        bare = dict(env, RAY_AUTH_MODE="disabled", RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash_port}")
        refused = subprocess.run([env["RAY"], "job", "list"], env=bare, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0
        assert "auth" in (refused.stdout + refused.stderr).lower()

        down = _script(["down"], env)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        pids = subprocess.run(
            ["bash", "-c", f"pgrep -f -- 'gcs_server_port={ray_port}|gcs-address=[^ ]*:{ray_port}'"],
            capture_output=True,
            text=True,
        )
        assert pids.stdout.strip() == "", f"left running: {pids.stdout}"
    finally:
        # Stops only this test's cluster (by its GCS port); other Ray clusters on the machine live on.
        _script(["down"], env)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- KubeRay's own schemas
CRDS = ROOT.parent / "shared" / "kuberay-crds"


def _strict(schema):
    """The CRD schema as ``kubectl apply --validate=strict`` applies it: an object schema with
    ``properties`` refuses other keys unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _crd_validators() -> dict[tuple[str, str], object]:
    import jsonschema

    out = {}
    for f in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(f.read_text())
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            key = (crd["spec"]["names"]["kind"], f"{crd['spec']['group']}/{version['name']}")
            out[key] = jsonschema.Draft7Validator(schema)
    return out


@pytest.mark.skipif(not CRDS.is_dir(), reason="../shared/kuberay-crds not present")
def test_kuberay_manifests_validate_against_the_operators_crds():
    """Every RayCluster, RayJob and RayCronJob in cluster/kubernetes/ is valid against the KubeRay
    operator's CRD schema of its kind and version, unknown fields refused; a typo'd key is caught."""
    validators = _crd_validators()
    checked = set()
    for name, doc in _k8s_docs():
        key = (doc["kind"], doc["apiVersion"])
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        assert key in validators, f"{name}: no CRD for {key}"
        errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"{name}: {errors[0].message} at {'.'.join(map(str, errors[0].absolute_path))}"
        checked.add(doc["kind"])
    assert checked == {"RayCluster", "RayJob", "RayCronJob"}
    (cluster,) = [d for _, d in _k8s_docs() if d["kind"] == "RayCluster"]
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    assert any(
        "rayStartParam" in e.message for e in validators[("RayCluster", cluster["apiVersion"])].iter_errors(typo)
    )
