"""crackscale evaluate on crop trees and photo sets; a training run on several sources at once."""

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import last_json, run_job, small_train_config

from crackscale import model as M
from crackscale.config.loader import dump, replace
from crackscale.data import sources

pytestmark = pytest.mark.slow


def test_evaluate_crops_and_photos_source_by_source(trained_run, synth_data, photo_set, tmp_path):
    from crackscale.evaluation import evaluate

    art = str(trained_run["artifact"])
    report = tmp_path / "report"
    out = run_job(
        ["jobs/evaluate.py", "--model", art, "--data", str(synth_data), "--data", str(photo_set)]
        + ["--report", str(report), "--max-errors", "5"],
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = last_json(out.stdout)
    summary, items = evaluate(art, [str(synth_data), str(photo_set)])
    assert got["sources"] == json.loads(json.dumps(summary["sources"]))  # the job and the function agree
    assert got["runtime"] == summary["runtime"] and got["threshold"] == summary["threshold"]
    # the table is what the items say, at the runtime's threshold
    y = np.array([r["label"] for r in items])
    p = np.array([r["probability"] for r in items])
    table = M.source_table(y, p, [r["source"] for r in items], summary["threshold"])
    assert {n: {k: e[k] for k in table[n]} for n, e in summary["sources"].items()} == table
    photos = summary["sources"][photo_set.name]
    assert photos["kind"] == "photos" and photos["photos"] == 8
    assert photos["n"] + photos["tiles_left_out"] == 8 * 12
    assert all(sources.split_item_uri(r["uri"])[1] for r in items if r["source"] == photo_set.name)
    crops = summary["sources"][synth_data.name]
    assert crops["kind"] == "crops" and crops["n"] == 300
    # the model learned synthetic cracks: it finds them in photos cut into tiles too
    assert crops["roc_auc"] >= 0.9 and photos["roc_auc"] >= 0.8, summary["sources"]
    # the page: a table row per source, each source's wrong items as pictures (at most 5 each)
    page = (report / "index.html").read_text()
    for name, entry in summary["sources"].items():
        assert f'id="src-{name}-n" data-value="{entry["n"]}"' in page
        wrong = entry["missed"] + entry["false_alarm_count"]
        shown = list((report / "errors" / name).glob("*.png")) if wrong else []
        assert len(shown) == min(wrong, 5), name
    assert len(re.findall(r'<figure class="f[np]"', page)) == sum(
        min(e["missed"] + e["false_alarm_count"], 5) for e in summary["sources"].values()
    )


def test_evaluate_one_split_and_bad_input(trained_run, photo_set, tmp_path):
    from crackscale.evaluation import evaluate

    art = trained_run["artifact"]
    manifest = list(csv.DictReader(io.StringIO((art / "manifest.csv").read_text())))
    data = Path(trained_run["cfg"].data[0].uri)
    summary, items = evaluate(str(art), str(data), split="test")
    assert sorted(r["uri"] for r in items) == sorted(r["uri"] for r in manifest if r["split"] == "test")
    assert summary["sources"][data.name]["n"] == summary["items"] == len(items)
    out = run_job(["jobs/evaluate.py", "--model", str(art), "--data", str(tmp_path / "nope")], timeout=300)
    assert out.returncode == 2 and "error: data path not found:" in out.stderr and "Traceback" not in out.stderr
    out = run_job(["jobs/evaluate.py", "--model", str(art), "--data", str(photo_set), "--split", "test"], timeout=300)
    assert out.returncode == 2 and "is in the artifact's test split: use --split all" in out.stderr


def test_training_on_crops_and_a_photo_set(synth_data, photo_set, tmp_path):
    """One run on a crop tree and a photo set (a quarter of each epoch): per-source counts and test
    tables in model.json, a threshold that keeps every source's target recall on validation, test
    scores of tiles named by their window, and the report's per-source table."""
    cfg = small_train_config(
        synth_data,
        tmp_path,
        source_size=227,
        image_size=64,
        head_epochs=6,
        min_epochs=2,
        fine_tune_epochs=1,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    cfg = replace(cfg, data=[{"uri": str(synth_data)}, {"uri": str(photo_set), "weight": 0.25, "target_recall": 0.9}])
    (tmp_path / "train.yaml").write_text(dump(cfg))
    out = run_job(["jobs/train.py", "--config", str(tmp_path / "train.yaml")])
    assert out.returncode == 0, out.stderr[-4000:]
    summary = last_json(out.stdout)
    art = Path(summary["artifact"])
    meta = json.loads((art / "model.json").read_text())
    after = meta["metrics"]["after"]
    assert set(meta["data_stats"]["sources"]) == set(after["per_source"]["test"]) == {synth_data.name, photo_set.name}
    assert meta["data_stats"]["sources"][photo_set.name]["kind"] == "photos"
    assert meta["target_recall_by_source"] == {photo_set.name: 0.9}
    own = after["threshold_by_source"]
    assert meta["threshold"] == min(own.values())
    val = after["per_source"]["val"]
    assert val[synth_data.name]["recall"] >= cfg.target_recall and val[photo_set.name]["recall"] >= 0.9
    # it learned on each source's held-out items (well above chance), and its loss fell
    assert all(e["roc_auc"] >= 0.75 for e in after["per_source"]["test"].values()), after["per_source"]["test"]
    losses = [h["loss"] for h in meta["history"]]
    assert min(losses[-3:]) < losses[0], losses
    preds = list(csv.DictReader(io.StringIO((art / "test_predictions.csv").read_text())))
    tiles = [r for r in preds if r["source"] == photo_set.name]
    assert tiles and all(sources.split_item_uri(r["uri"])[1] for r in tiles)
    page = (art / "report" / "index.html").read_text()
    assert "Test split, source by source" in page and f'id="test-{photo_set.name}-n"' in page


def test_benchmark_field_leaves_one_source_out(synth_data, photo_set, tmp_path):
    """Trained without the photo set, measured on all of it and on the crop tree's test split."""
    cfg = small_train_config(synth_data, tmp_path, image_size=64, head_epochs=2, fine_tune_epochs=0, min_epochs=0)
    cfg = replace(cfg, data=[{"uri": str(synth_data)}, {"uri": str(photo_set), "name": "walls"}], name="", seed=3)
    (tmp_path / "field.yaml").write_text(dump(cfg))
    results = tmp_path / "results.jsonl"
    args = ["--config", str(tmp_path / "field.yaml"), "--leave-out", "walls", "--results", str(results)]
    out = run_job(["jobs/benchmark_field.py", *args])
    assert out.returncode == 0, out.stderr[-4000:]
    r = last_json(out.stdout)
    assert json.loads(results.read_text()) == r
    assert (r["left_out"], r["run"], r["epochs_run"]) == ("walls", "field-walls-s3", 2)
    meta = json.loads((Path(r["artifact"]) / "model.json").read_text())
    assert list(meta["data_stats"]["sources"]) == [synth_data.name]  # never trained on the photo set
    assert r["left_out_all"]["n"] + r["left_out_all"]["tiles_left_out"] == 8 * 12  # all of it
    assert list(r["test"]) == [synth_data.name]
    assert r["test"][synth_data.name]["n"] == sum(meta["data_stats"]["per_split"]["test"].values())
    bad = run_job(["jobs/benchmark_field.py", "--config", str(tmp_path / "field.yaml"), "--leave-out", "nope"])
    assert bad.returncode == 2 and "--leave-out 'nope' is not a source of the config" in bad.stderr
