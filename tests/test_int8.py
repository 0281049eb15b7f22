"""int8 LiteRT: stored with the artifact and measured on its validation split, chosen by
``runtime: auto`` only when its quality holds, forced with ``litert-int8``, added to an existing
artifact with ``crackscale export --int8``; every row is judged at its runtime's threshold."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import PY, last_json

from crackscale import artifact, query
from crackscale.config.score import ScoreConfig
from crackscale.reports import training as report_training
from crackscale.scoring import commit, keys, predictor
from crackscale.scoring import run as scoring_run


def _record(recall: float, accuracy: float, fp32_recall: float = 0.98, fp32_accuracy: float = 0.97) -> dict:
    return {
        "litert_int8": {
            "sha256": "0" * 64,
            "val": {"n": 500, "recall": recall, "accuracy": accuracy},
            "fp32_val": {"n": 500, "recall": fp32_recall, "accuracy": fp32_accuracy},
        }
    }


@pytest.mark.parametrize(
    ("meta", "chosen", "why"),
    [
        (_record(0.98, 0.97), True, "validation recall 0.9800 vs fp32 0.9800"),
        (_record(0.99, 0.9681), True, "accuracy 0.9681 vs 0.9700"),
        (_record(0.978, 0.99), False, "misses more cracks"),
        (_record(0.98, 0.9679), False, "accuracy more than 0.2 points lower"),
        ({}, False, "no int8 export"),
        ({"litert_int8": {"error": "no int8 kernel for X"}}, False, "no int8 kernel for X"),
    ],
)
def test_int8_is_chosen_only_when_it_misses_no_more_cracks_and_keeps_accuracy(meta, chosen, why):
    ok, said = artifact.int8_qualifies(meta)
    assert ok is chosen and why in said, said


def test_each_row_is_judged_at_its_runtimes_threshold():
    t = pa.table(
        {
            "uri": ["a", "b"],
            "size": [1, 1],
            "etag": ["", ""],
            "mtime_ns": [-1, -1],
            "crack_probability": pa.array([0.4, 0.4], pa.float32()),
            "error": ["", ""],
            "runtime": ["litert-int8", "litert"],
            "scored_at_us": [0, 0],
            "threshold": pa.array([0.3, 0.5], pa.float32()),
        }
    )
    rows = commit.rows_table(t, {"threshold": 0.5, "name": "m"}, "run")
    assert rows["crack"].to_pylist() == [True, False] and rows["crack_tiles"].to_pylist() == [1, 0]
    assert rows["threshold"].to_pylist() == pytest.approx([0.3, 0.5])


def test_litert_int8_without_an_int8_export_names_the_fix(model_artifact):
    cfg = ScoreConfig(model=model_artifact["uri"], runtime="litert-int8")
    with pytest.raises(artifact.ArtifactError, match=r"no int8 export.*crackscale export --int8"):
        predictor.artifact_litert(cfg)


@pytest.mark.slow
def test_trained_artifact_holds_a_measured_int8_export_that_scores(trained_run, ray_local, tmp_path):
    """The shared real training run stored ``model_int8.tflite`` (a third of the fp32 file),
    checksummed and measured on the whole validation split; auto picks it exactly when the gate
    says so; forced, it scores every image with its own threshold, its probabilities following
    fp32's."""
    art = trained_run["artifact"]
    meta = artifact.read_meta(str(art))
    rec = meta["litert_int8"]
    assert rec["sha256"] == artifact.sha256_file(art / artifact.INT8_FILE)
    assert (art / artifact.INT8_FILE).stat().st_size < 0.5 * (art / artifact.LITERT_FILE).stat().st_size
    val_n = sum(trained_run["summary"]["data"]["per_split"]["val"].values())
    assert rec["val"]["n"] == rec["fp32_val"]["n"] == val_n and 0 < rec["representative_images"] <= 200
    assert rec["fp32_val"]["recall"] == pytest.approx(meta["metrics"]["after"]["val"]["recall"])
    assert 0.0 <= rec["max_abs_diff"] < 1.0 and 0.0 < rec["threshold"] < 1.0

    ok, _ = artifact.int8_qualifies(meta)
    _, info = predictor.artifact_litert(ScoreConfig(model=str(art)))
    assert info["runtime"] == ("litert-int8" if ok else "litert")

    images = tmp_path / "in"
    images.mkdir()
    src = sorted(Path(trained_run["cfg"].data[0].uri).rglob("*.jpg"))[::10]
    for i, p in enumerate(src):
        shutil.copy(p, images / f"{i:03d}.jpg")
    assert len(src) >= 20
    scored = {}
    for runtime in ("litert-int8", "litert"):
        out = tmp_path / runtime
        cfg = ScoreConfig(model=str(art), input=str(images), output=str(out), runtime=runtime)
        s = scoring_run.run(cfg)
        assert (s["scored"], s["failed"], s["runtime"]) == (len(src), 0, runtime), s
        t = query.open_scores(str(out)).to_table().to_pylist()
        scored[runtime] = {r["uri"]: r for r in t}
    int8_rows, fp32_rows = scored["litert-int8"], scored["litert"]
    assert all(r["threshold"] == pytest.approx(rec["threshold"]) for r in int8_rows.values())
    assert all(r["threshold"] == pytest.approx(meta["threshold"]) for r in fp32_rows.values())
    assert all(r["crack"] == (r["crack_probability"] >= np.float32(r["threshold"])) for r in int8_rows.values())
    # the same model, quantised: its probabilities follow fp32's (how often the decisions agree is
    # the model's own property, measured on validation in the record)
    uris = sorted(int8_rows)
    p8 = np.array([int8_rows[u]["crack_probability"] for u in uris])
    p32 = np.array([fp32_rows[u]["crack_probability"] for u in uris])
    assert np.corrcoef(p8, p32)[0, 1] >= 0.9, (p8, p32)
    # one model: the int8 rows carry the artifact's model_id
    assert {r["model_id"] for r in int8_rows.values()} == {keys.model_id(meta)}


@pytest.mark.slow
def test_export_int8_adds_it_to_an_existing_artifact(trained_run, tmp_path):
    """An artifact without int8 gains it from `crackscale export --int8`, calibrated and measured on
    the images its manifest.csv names; its model (and model_id) stay. Unreadable training images
    stop the export with one line naming the file."""
    art = tmp_path / "model"
    shutil.copytree(trained_run["artifact"], art)
    (art / artifact.INT8_FILE).unlink()
    meta = json.loads((art / "model.json").read_text())
    del meta["litert_int8"]
    (art / "model.json").write_text(json.dumps(meta))
    cmd = [PY, "-m", "crackscale.cli"]
    r = subprocess.run([*cmd, "export", "--int8", str(art)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    after = json.loads((art / "model.json").read_text())
    digest = artifact.sha256_file(art / artifact.INT8_FILE)
    assert out["litert_int8"]["sha256"] == after["litert_int8"]["sha256"] == digest
    assert after["model_sha256"] == meta["model_sha256"] and out["runtime_auto_uses_int8"] in (True, False)
    # the training report shows it beside tf.keras, and which runtime auto picks
    page = Path(report_training.training_report(str(art))).read_text()
    assert f"id='int8-chosen' data-value='{str(out['runtime_auto_uses_int8']).lower()}'" in page

    with open(art / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    next(r for r in rows if r["split"] == "train")["uri"] = "/nowhere/gone.jpg"
    with open(art / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    bad = subprocess.run([*cmd, "export", "--int8", str(art)], capture_output=True, text=True, timeout=600)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "/nowhere/gone.jpg" in errors[0], bad.stderr[-2000:]


@pytest.mark.parametrize(
    ("record", "chosen", "why"),
    [
        ({"max_abs_diff": 0.004, "agreement": 1.0, "images": 64}, True, "max |Δp| 4.00e-03"),
        ({"max_abs_diff": 0.02, "agreement": 1.0, "images": 64}, False, "beyond |Δp| 0.01"),
        ({"max_abs_diff": 0.001, "agreement": 63 / 64, "images": 64}, False, "changed decision"),
        ({"error": "no float16 kernel"}, False, "no float16 kernel"),
    ],
)
def test_float16_is_chosen_on_gpus_only_when_its_parity_holds(record, chosen, why):
    ok, said = artifact.fp16_qualifies({"mixed_precision": {"scoring_fp16": record}})
    assert ok is chosen and why in said, said


@pytest.mark.slow
def test_float16_scoring_agrees_with_float32(trained_run):
    """The artifact records float16's parity on validation images, and the gate reads that record; a
    model actor told ``mixed_precision: true`` scores in float16 (``tf-fp16``, CPU here): the same
    model (close to float32), but not float32 in disguise. Whether float16 is close enough for
    ``auto`` depends on the model: this small one trained from scratch may well miss the gate."""
    art = str(trained_run["artifact"])
    meta = artifact.read_meta(art)
    rec = meta["mixed_precision"]["scoring_fp16"]
    assert meta["mixed_precision"]["training"] is False and rec["images"] > 0 and 0 <= rec["max_abs_diff"] < 0.2
    ok, _ = artifact.fp16_qualifies(meta)
    assert ok == (rec["max_abs_diff"] <= artifact.FP16_TOLERANCE and rec["agreement"] == 1.0)
    src = sorted(Path(trained_run["cfg"].data[0].uri).rglob("*.jpg"))[::15]
    batch = {"uri": np.array([str(p) for p in src], dtype=object), "size": np.full(len(src), -1)}
    decode = {"image_size": meta["image_size"], "cfg": ScoreConfig(), "antialias": meta["resize_antialias"]}
    out = {}
    for mp in ("true", "false"):
        pred = predictor.Predictor(ScoreConfig(model=art, runtime="tf", mixed_precision=mp), decode=decode)
        out[mp] = pred(dict(batch))
    assert set(out["true"]["runtime"]) == {"tf-fp16"} and set(out["false"]["runtime"]) == {"tf"}
    diff = np.abs(out["true"]["crack_probability"] - out["false"]["crack_probability"])
    assert not any(out["true"]["error"]) and 0 < diff.max() < 0.2, diff.max()


def test_int8_is_measured_on_at_most_2000_seeded_validation_images():
    """A big validation split is sampled (its images are decoded at once); a small one is used whole."""
    from crackscale.training.inputs import MEASURED_MAX, measured

    images, labels = list(range(5000)), [i % 2 for i in range(5000)]
    x, y = measured(images, labels, seed=3)
    assert len(x) == MEASURED_MAX and y == [labels[i] for i in x] and x == sorted(set(x))
    assert measured(images, labels, seed=3) == (x, y) and measured(images, labels, seed=4)[0] != x
    assert measured(images[:10], labels[:10], seed=3) == (images[:10], labels[:10])
