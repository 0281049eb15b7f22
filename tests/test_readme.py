"""The README's tour and the tuning page's commands, run as a user types them.

The fenced ``bash`` blocks of README.md ("Five-minute tour") and docs/tuning.md ("Running it") run
unchanged, one page at a time, in a copy of the checkout (so ``demo/`` is the copy's) whose
``.venv`` is the suite's virtualenv. What the test sets up around the commands, never in them:

- the copy's shipped demo configs train for fewer epochs and tune fewer trials (without int8 exports);
- ``cluster/local/cluster.sh`` gets its own ports and Ray temp dir through its environment settings,
  because other tests' clusters share this machine;
- ``RAY_ADDRESS=local``, as for every test: a job script run without ``ray job submit`` gets a
  private Ray, as on a machine where no cluster runs.

Then, with the cluster stopped, every output is where the pages say, and none is inside Ray's
directories (the job's copy of the working directory, the trials' working directories).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import PY, ROOT, free_port, private_agent_ports, stop_ray_under

pytestmark = pytest.mark.slow

# Fewer epochs, images and trials; the commands and every path in the configs stay as shipped.
SHORT_TRAINING = {
    "synth_per_class": 60,
    "head_epochs": 2,
    "fine_tune_epochs": 1,
    "min_epochs": 1,
}
SHORT_TUNING = {"num_samples": 2, "grace_period": 1, "perturbation_interval": 1}


def bash_blocks(page: Path, section: str) -> list[str]:
    """The ```bash blocks under the ``## section`` heading of ``page``, in order."""
    text = page.read_text()
    assert f"\n## {section}\n" in text, f"{page.name} has no section '{section}'"
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
    assert blocks, f"{page.name} '{section}' has no bash blocks"
    return blocks


def checkout_copy(dst: Path) -> Path:
    """The files a fresh clone has (tracked and not ignored), with this suite's virtualenv as its
    ``.venv``: every entry linked, except a fresh ``.installed`` stamp so ``make`` installs nothing."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    venv = Path(PY).parent.parent
    (dst / ".venv").mkdir()
    for entry in venv.iterdir():
        if entry.name != ".installed":
            (dst / ".venv" / entry.name).symlink_to(entry)
    (dst / ".venv" / ".installed").touch()
    return dst


def shorten(config: Path, changes: dict, section: str | None = None, add: dict | None = None) -> None:
    """``changes`` to keys the shipped config sets, and ``add``: keys it leaves at their defaults."""
    data = yaml.safe_load(config.read_text())
    target = data[section] if section else data
    assert set(changes) <= set(target), f"{config.name} has no {set(changes) - set(target)}"
    target.update(changes, **(add or {}))
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def run_page(project: Path, blocks: list[str], ray_tmp: Path) -> subprocess.CompletedProcess:
    """``blocks`` as one bash script from the project root, with a private cluster.sh cluster."""
    port = free_port()
    env = dict(
        os.environ,
        RAY_PORT=str(port),
        DASHBOARD_PORT=str(free_port()),
        TEMP_DIR=str(ray_tmp),
        NUM_CPUS="4",
        RAY_START_ARGS=" ".join(private_agent_ports()),
        RAY_ADDRESS="local",
    )
    env.pop("VIRTUAL_ENV", None)
    # a user's shell before `source .venv/bin/activate`: the suite's virtualenv is not on PATH
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != Path(PY).parent)
    script = "set -eo pipefail\nset -x\n" + "\n".join(blocks)
    try:
        return subprocess.run(
            ["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=2400
        )
    finally:
        # whatever happened, this page's cluster (and only it) is stopped before the checks
        subprocess.run(["bash", "cluster/local/cluster.sh", "down"], cwd=project, env=env, capture_output=True)
        stop_ray_under(ray_tmp)


@pytest.fixture
def project(tmp_path):
    # short: Ray's unix socket paths under its temp dir must stay within 107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
    yield checkout_copy(tmp_path / "crackscale"), ray_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


def nothing_in_rays_directories(ray_tmp: Path) -> None:
    stray = [p for p in ray_tmp.rglob("*") if p.name in ("model.json", "model.keras") or p.suffix == ".parquet"]
    assert not stray, f"outputs inside Ray's temp dir: {stray[:5]}"


def test_readme_tour_as_written(project):
    from crackscale import query
    from crackscale.scoring import keys

    root, ray_tmp = project
    shorten(root / "jobs/configs/demo.yaml", SHORT_TRAINING)
    r = run_page(root, bash_blocks(root / "README.md", "Five-minute tour"), ray_tmp)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-8000:]

    # 1. make demo: the model where the README says, with its report
    models = sorted(root.glob("demo/runs/train-*/model"))
    assert len(models) == 1 and (models[0] / "model.json").is_file(), models
    assert (models[0] / "report" / "index.html").is_file()
    # 5. the model trained on the cluster outlives the cluster, in the user's folder
    on_cluster = root / "demo/runs/on-cluster/model"
    assert (on_cluster / "model.json").is_file() and (on_cluster / "model.tflite").is_file()
    # 2. + 5. every image once per model: the local run, then the cluster's run with the new model
    images = sorted(p for p in (root / "demo/data").rglob("*.jpg"))
    assert len(images) == 2 * SHORT_TRAINING["synth_per_class"]
    rows = query.open_scores(str(root / "demo/scores")).to_table(columns=["model_id", "uri"]).to_pylist()
    ids = {keys.model_id(json.loads((m / "model.json").read_text())) for m in (models[0], on_cluster)}
    assert len(ids) == 2
    for model_id in ids:
        uris = [row["uri"] for row in rows if row["model_id"] == model_id]
        assert sorted(uris) == sorted(str(p) for p in images), model_id
    assert len(rows) == 2 * len(images)
    # 2. whole photos and 4. reports
    assert list(root.glob("demo/photo-scores/_reports/*/maps/000.png"))
    assert len(list(root.glob("demo/scores/_reports/*/index.html"))) == 2
    # measured source by source: a photo set with masks, and the training data's test split
    for report in ("demo/evaluation", "demo/evaluation-test"):
        assert (root / report / "index.html").is_file(), report
    assert len(list(root.glob("demo/photo-set/masks/*.png"))) == 4
    nothing_in_rays_directories(ray_tmp)


def test_tuning_page_as_written(project):
    root, ray_tmp = project
    shorten(root / "jobs/configs/tune.yaml", SHORT_TUNING)
    # the trials' int8 exports are the training page's matter, not this one's
    shorten(root / "jobs/configs/tune.yaml", SHORT_TRAINING, section="train", add={"int8": False})
    r = run_page(root, bash_blocks(root / "docs/tuning.md", "Running it"), ray_tmp)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-8000:]

    local = sorted(root.glob("demo/runs/tune-2*/best-model"))
    assert len(local) == 1 and (local[0] / "model.json").is_file(), local
    on_cluster = root / "demo/runs/tune-on-cluster"
    assert (on_cluster / "best-model" / "model.json").is_file()
    meta = json.loads((on_cluster / "best-model" / "model.json").read_text())
    assert (meta["tune"]["experiment"], meta["tune"]["scheduler"]) == ("tune-on-cluster", "pbt")
    # the trials' models under the experiment, none in the trials' working directories
    assert list(on_cluster.glob("trial-models/*/model.json"))
    nothing_in_rays_directories(ray_tmp)
