"""Training and scoring reports from real small runs, opened in a real headless Chromium: every
image loads, and the numbers on the page are the ones in model.json / test_predictions.csv / the
Parquet outputs (read back independently with DuckDB)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import PY, ROOT, last_json, upload_tree
from PIL import Image

from crackscale import query
from crackscale.config.score import ScoreConfig
from crackscale.reports import page as report_page
from crackscale.reports import scoring as report_scoring
from crackscale.reports import training as report_training
from crackscale.scoring import run as scoring_run

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing (a failed install fails the tests)."""
    if not os.path.exists(CHROMIUM):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing after apt-get install chromium"
    return CHROMIUM


class Page(HTMLParser):
    """Text of every element with an id, every <img>, every <figure>'s attributes (in order)."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self.imgs: list[dict] = []
        self.figures: list[dict] = []
        self.rows: list[dict] = []
        self._open: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "figure":
            self.figures.append(a)
        elif tag == "tr" and "data-epoch" in a:
            self.rows.append(a)
        if "id" in a:
            self.ids[a["id"]] = ""
            self._open.append(a["id"])

    def handle_endtag(self, tag: str) -> None:
        pass

    def handle_data(self, data: str) -> None:
        for i in self._open:
            self.ids[i] += data
        self._open = []


def browse(chromium: str, index: Path, tmp: Path) -> tuple[Page, Path]:
    """Open ``index`` like a user would: the DOM after load (scripts run) and a screenshot."""
    url = index.resolve().as_uri()
    shot = tmp / "screenshot.png"
    r = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp / 'ud1'}", f"--screenshot={shot}", "--window-size=1280,2000", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    r = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp / 'ud2'}", "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0 and "</html>" in r.stdout, r.stderr[-2000:]
    return Page(r.stdout), shot


def check_loaded(page: Page, shot: Path, n_images: int) -> None:
    assert page.ids["broken-images"] == "0" and page.ids["image-count"] == str(n_images), page.ids
    assert len(page.imgs) == n_images and all(not i["src"].startswith(("http", "//")) for i in page.imgs)
    im = Image.open(shot)
    assert im.size == (1280, 2000) and shot.stat().st_size > 30_000
    assert np.asarray(im.convert("L"), np.float32).std() > 10  # not a blank page


def f4(v: float) -> str:
    return f"{v:.4f}"


@pytest.fixture(scope="module")
def trained(trained_run, tmp_path_factory) -> str:
    """A copy (reports are written into it) of the shared real two-phase training run's artifact."""
    dest = tmp_path_factory.mktemp("rep") / "model"
    shutil.copytree(trained_run["artifact"], dest)
    return str(dest)


def test_training_report(trained, chromium, tmp_path, s3_server, s3_bucket):
    index = report_training.training_report(trained)
    assert index == str(Path(trained, "report", "index.html"))
    meta = json.loads(Path(trained, "model.json").read_text())
    preds = list(csv.DictReader(io.StringIO(Path(trained, "test_predictions.csv").read_text())))
    page, shot = browse(chromium, Path(index), tmp_path)

    thr = meta["threshold"]
    fn = [r for r in preds if r["label"] == "1" and float(r["probability"]) < thr]
    fp = [r for r in preds if r["label"] == "0" and float(r["probability"]) >= thr]
    check_loaded(page, shot, 2 + min(24, len(fn) + len(fp)))  # curves, test plots, error thumbnails
    m = meta["metrics"]
    for when in ("before", "after"):
        for split in ("val", "test"):
            for key in ("accuracy", "precision", "recall", "roc_auc", "threshold"):
                assert page.ids[f"{when}-{split}-{key.replace('_', '-')}"] == f4(m[when][split][key])
    test = m["after"]["test"]
    assert page.ids["threshold"] == f4(thr)
    assert (page.ids["test-precision"], page.ids["test-recall"]) == (f4(test["precision"]), f4(test["recall"]))
    for k in ("tn", "fp", "fn", "tp"):
        assert page.ids[f"cm-{k}"] == str(test["confusion_matrix"][k])
    # the matrix and the per-image file describe the same test split
    cm = test["confusion_matrix"]
    assert cm["tp"] + cm["fn"] == sum(r["label"] == "1" for r in preds) and cm["tn"] + cm["fp"] == len(preds) - (
        cm["tp"] + cm["fn"]
    )
    # learning curves: one row per epoch, phases in order; early stop stated as it happened
    hist = meta["history"]
    assert page.ids["epochs-run"] == str(len(hist))
    assert [(int(r["data-epoch"]), r["data-phase"]) for r in page.rows] == [(h["epoch"], h["phase"]) for h in hist]
    stopped = any(sum(h["phase"] == ph for h in hist) < meta["config"][f"{ph}_epochs"] for ph in ("head", "fine_tune"))
    assert page.ids["early-stop"].startswith("Early stop" if stopped else "No early stop")
    # the error grid: false negatives first (lowest score first), then false positives
    assert (page.ids["n-false-negatives"], page.ids["n-false-positives"]) == (str(len(fn)), str(len(fp)))
    grid = [(f["class"], f["data-uri"], float(f["data-probability"])) for f in page.figures]
    want = [("fn", r["uri"], float(r["probability"])) for r in sorted(fn, key=lambda r: float(r["probability"]))] + [
        ("fp", r["uri"], float(r["probability"])) for r in sorted(fp, key=lambda r: -float(r["probability"]))
    ]
    # the page shows 6 decimals; the CSV keeps full precision
    assert [(c, u) for c, u, _ in grid] == [(c, u) for c, u, _ in want[:24]]
    assert all(abs(a[2] - b[2]) < 1e-6 for a, b in zip(grid, want))
    assert Path(trained, "tensorboard").is_dir() and "tensorboard --logdir" in Path(index).read_text()

    # the same report for an artifact on S3 lands next to it
    upload_tree(s3_server, Path(trained), s3_bucket, "models/rep")
    uri = report_training.training_report(f"s3://{s3_bucket}/models/rep")
    assert uri == f"s3://{s3_bucket}/models/rep/report/index.html"
    import boto3

    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
            Bucket=s3_bucket, Prefix="models/rep/report/"
        )["Contents"]
    }
    assert {f"models/rep/report/{n}" for n in ("index.html", "learning_curves.png", "test_curves.png")} <= keys
    assert sum(k.endswith(".png") for k in keys) == 2 + min(24, len(fn) + len(fp))


def night(synth_data: Path, dest: Path, neg: slice, pos: slice, bad: bool = False) -> Path:
    dest.mkdir(parents=True)
    for cls, sl in (("Negative", neg), ("Positive", pos)):
        for p in sorted((synth_data / cls).glob("*.jpg"))[sl]:
            shutil.copy(p, dest / f"{cls}-{p.name}")
    if bad:
        (dest / "empty.jpg").write_bytes(b"")
        (dest / "notes.jpg").write_bytes(b"inspection notes, not an image")
    return dest


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov–Smirnov statistic, brute force (independent of report_scoring.ks_statistic)."""
    return max(abs((a <= x).mean() - (b <= x).mean()) for x in np.r_[a, b])


def test_scoring_report(ray_local, trained, synth_data, chromium, tmp_path, s3_server, s3_bucket):
    out = str(tmp_path / "scores")
    runs = {}
    for date, d in (
        ("2026-11-23", night(synth_data, tmp_path / "n1", slice(100, 115), slice(100, 105))),
        ("2026-11-24", night(synth_data, tmp_path / "n2", slice(120, 125), slice(120, 135), True)),
    ):
        runs[date] = scoring_run.run(
            ScoreConfig(
                model=trained, input=str(d), output=out, batch_size=8, chunk_size=8, runtime="tf", run_date=date
            )
        )
    s = runs["2026-11-24"]
    assert (s["listed"], s["scored"], s["failed"]) == (22, 20, 2)
    # regenerated from the outputs alone, as a user would
    r = subprocess.run(
        [PY, "-m", "crackscale.cli", "report", "--run", s["run_id"], "--output", out, "--top", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    index = Path(last_json(r.stdout)["report"])
    assert index == Path(out, "_reports", s["run_id"], "index.html")
    page, shot = browse(chromium, index, tmp_path)
    check_loaded(page, shot, 1 + 8)  # histogram + top 8

    con = query.connect(out)
    one = lambda q, *p: con.sql(q, params=list(p) or None).fetchall()  # noqa: E731
    ((ok, failed, flagged),) = one(
        "SELECT count(*) FILTER (WHERE error IS NULL), count(error), "
        "count(*) FILTER (WHERE crack) FROM scores WHERE run_id = ?",
        s["run_id"],
    )
    assert (page.ids["scored"], page.ids["failed"], page.ids["flagged"]) == (str(ok), str(failed), str(flagged))
    assert (page.ids["listed"], page.ids["already-scored"]) == ("22", "0")
    assert page.ids["flagged-share"] == f4(flagged / ok)
    assert (
        page.ids["duration-s"] == f"{s['duration_s']:.1f}" and page.ids["throughput"] == f"{s['throughput_img_s']:.1f}"
    )
    kinds = dict(
        one(
            "SELECT split_part(error, ':', 1), count(*) FROM scores WHERE run_id = ? AND error IS NOT NULL GROUP BY 1",
            s["run_id"],
        )
    )
    assert kinds == {"empty file": 1, "decode": 1}
    assert all(page.ids[f"failed-{k.replace(' ', '-')}"] == str(v) for k, v in kinds.items())
    # comparison with the previous night, recomputed here
    p1 = np.array(
        [v for (v,) in one("SELECT crack_probability FROM scores WHERE run_date = '2026-11-23' AND error IS NULL")]
    )
    p2 = np.array(
        [v for (v,) in one("SELECT crack_probability FROM scores WHERE run_id = ? AND error IS NULL", s["run_id"])]
    )
    thr = float(one("SELECT any_value(threshold) FROM scores")[0][0])
    assert page.ids["previous-night"] == "2026-11-23"
    assert page.ids["previous-flagged-share"] == f4((p1 >= thr).mean())
    assert page.ids["flagged-share-delta"] == f4(flagged / ok - (p1 >= thr).mean())
    assert abs(float(page.ids["ks-statistic"]) - ks(p1, p2)) < 1e-4
    assert ("drift-alert" in page.ids) == (abs(flagged / ok - (p1 >= thr).mean()) >= 0.05 or ks(p1, p2) >= 0.2)
    # the gallery: this run's top 8 by P(crack), each with its URI, heatmaps drawn (model loadable)
    top = one(
        "SELECT uri, crack_probability FROM scores WHERE run_id = ? AND error IS NULL "
        "ORDER BY crack_probability DESC, uri LIMIT 8",
        s["run_id"],
    )
    assert [f["data-uri"] for f in page.figures] == [u for u, _ in top]
    assert all(abs(float(f["data-probability"]) - p) < 1e-6 for f, (_, p) in zip(page.figures, top))
    assert "No heatmaps" not in index.read_text()

    # the same report for outputs on S3 is written next to them
    upload_tree(s3_server, Path(out), s3_bucket, "scores")
    uri = report_scoring.scoring_report(f"s3://{s3_bucket}/scores", s["run_id"], top_n=4)
    assert uri == f"s3://{s3_bucket}/scores/_reports/{s['run_id']}/index.html"
    import boto3

    objs = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=s3_bucket, Prefix=f"scores/_reports/{s['run_id']}/"
    )["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[-1] for o in objs if not o["Key"].endswith("/")) == [
        "000.png",
        "001.png",
        "002.png",
        "003.png",
        "histogram.png",
        "index.html",
    ]
    assert report_page.safely(report_scoring.scoring_report, out, "no-such-run") == ""  # jobs never fail on a report
    # built ahead in a process of its own, as `crackscale score` does: the same page, heatmaps included
    direct = Path(report_scoring.scoring_report(out, s["run_id"])).read_text()
    with report_scoring.ReportProcess(trained) as ahead:
        assert ahead.build(out, s["run_id"]) == str(index)
    assert index.read_text() == direct and "No heatmaps" not in direct
    with report_scoring.ReportProcess(trained) as ahead:  # a failed report is a warning, never a failure
        assert ahead.build(out, "no-such-run") == ""

    # heatmaps without TensorFlow: from the heatmap export saved with the artifact; an artifact
    # without one falls back to TensorFlow, and `crackscale export --heatmap` adds it
    no_tf = (
        "import sys; sys.modules['tensorflow'] = None  # any import of it fails\n"
        "from crackscale.reports import scoring\n"
        "print(scoring.scoring_report(sys.argv[1], sys.argv[2], model_uri=sys.argv[3]))"
    )

    def tops(model: str, tensorflow: bool = False) -> tuple[str, list[np.ndarray]]:
        """The report's page and its top images (pixels), built in this process or without TF."""
        if tensorflow:
            index = Path(report_scoring.scoring_report(out, s["run_id"], model_uri=model))
        else:
            r = subprocess.run([PY, "-c", no_tf, out, s["run_id"], model], cwd=ROOT, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
            index = Path(r.stdout.strip().splitlines()[-1])
        pngs = sorted((index.parent / "top").glob("*.png"))
        return index.read_text(), [np.asarray(Image.open(f).convert("RGB"), np.float32) for f in pngs]

    record = json.loads(Path(trained, "model.json").read_text())["heatmap"]
    # maps scaled to 0..1: XNNPACK's and TensorFlow's float32 sums differ by about 1e-4 with the
    # trained weights, which CPU training does not reproduce bit for bit; a picture needs far less
    assert record["file"] == "heatmap.tflite" and record["parity_max_abs_diff"] < 1e-3
    text, lite = tops(trained)
    assert "No heatmaps" not in text and len(lite) == 12
    old = tmp_path / "old-model"
    shutil.copytree(trained, old)
    (old / "heatmap.tflite").unlink()
    meta = json.loads((old / "model.json").read_text())
    del meta["heatmap"]
    (old / "model.json").write_text(json.dumps(meta))
    assert "No heatmaps" in tops(str(old))[0]  # Grad-CAM needs TensorFlow, which that process lacks
    _, grad_cam = tops(str(old), tensorflow=True)
    r = subprocess.run([PY, "-m", "crackscale.cli", "export", "--heatmap", str(old)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert last_json(r.stdout)["heatmap"]["sha256"] == json.loads((old / "model.json").read_text())["heatmap"]["sha256"]
    text, exported = tops(str(old))
    assert "No heatmaps" not in text
    # the same overlays as TensorFlow's Grad-CAM, but for how each upsamples the 1/32 map
    assert max(np.abs(a - b).mean() for a, b in zip(exported, grad_cam)) < 2.0
    assert max(np.abs(a - b).mean() for a, b in zip(exported, lite)) < 0.01
    data = bytearray((old / "heatmap.tflite").read_bytes())  # a tampered export is refused, not drawn
    data[len(data) // 2] ^= 0xFF
    (old / "heatmap.tflite").write_bytes(bytes(data))
    text, _ = tops(str(old))
    assert "No heatmaps" in text and "heatmap.tflite of" in text and "does not match the checksum" in text

    # a re-run finds everything scored: its report says so from the summary (no rows of its own)
    again = scoring_run.run(
        ScoreConfig(model=trained, input=str(tmp_path / "n2"), output=out, runtime="tf", run_date="2026-11-24")
    )
    assert (again["already_scored"], again["scored"]) == (22, 0)
    text = Path(report_scoring.scoring_report(out, again["run_id"])).read_text()
    assert 'id="already-scored" data-value="22"' in text and 'id="scored" data-value="0"' in text
    assert "No images scored in this run." in text


ODD_NAMES = ('quote"d, comma é space.jpg', "new\nline.jpg", "plain.jpg")


def test_odd_uris_and_hostile_model_json_values_survive_csv_and_html(synth_data, tmp_path):
    """URIs with quotes, commas, non-ASCII, spaces and newlines come back unaltered from
    manifest.csv and test_predictions.csv (written and read by ``csv``), so the report finds their
    images; every model.json value on the page is escaped."""
    from crackscale.data import labelled
    from crackscale.training.quality import predictions_csv

    images = tmp_path / "imgs"
    images.mkdir()
    src = sorted((synth_data / "Positive").glob("*.jpg"))
    uris = []
    for name, f in zip(ODD_NAMES, src):
        (images / name).write_bytes(f.read_bytes())
        uris.append(str(images / name))
    manifest = [
        {"uri": u, "class": "Positive", "label": 1, "sha256": "0" * 64, "group": "g", "split": "test"} for u in uris
    ]
    back = list(csv.DictReader(io.StringIO(labelled.manifest_csv(manifest))))
    assert [r["uri"] for r in back] == uris
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "test_predictions.csv").write_text(predictions_csv(uris, [1, 1, 1], np.array([0.1, 0.2, 0.9])))
    evil = "<script>alert(1)</script>"
    meta = {
        "name": evil,
        "created_at": evil,
        "threshold": 0.5,
        "target_recall": evil,
        "num_workers": evil,
        "versions": {"crackscale": evil},
        "history": [{"epoch": evil, "phase": evil, "loss": evil}],
        "metrics": {"after": {"test": {"n": evil}}},
        "data_stats": {"per_split": {evil: {"Positive": 1}}},
        "config": {},
    }
    (art / "model.json").write_text(json.dumps(meta))
    page = Path(report_training.training_report(str(art))).read_text()
    assert evil not in page and "&lt;script&gt;" in page
    # the two missed cracks (p below the threshold) are shown, their images found
    assert "image unavailable" not in page and page.count("<img") >= 2
