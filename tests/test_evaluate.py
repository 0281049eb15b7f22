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


def test_training_on_several_sources_leaving_one_out(synth_data, photo_set, tmp_path):
    """``jobs/benchmark_field.py`` trains on a crop tree and a photo set (a quarter of each epoch,
    its own recall target) and leaves a third source out, then measures the model on all of that
    one and on the others' test splits. model.json: per-source counts and tables, a threshold that
    keeps every source's target on validation; test scores name tiles by their window; the
    report shows the per-source table."""
    from crackscale.data import synth

    site = synth.generate(tmp_path / "site-b", per_class=20, seed=11)
    cfg = small_train_config(
        synth_data, tmp_path, source_size=227, image_size=64, head_epochs=5, min_epochs=2, fine_tune_epochs=1
    )
    data = [
        {"uri": str(synth_data)},
        {"uri": str(photo_set), "name": "walls", "weight": 0.25, "target_recall": 0.9},
        {"uri": str(site)},
    ]
    cfg = replace(cfg, data=data, name="", seed=3, val_fraction=0.25, test_fraction=0.25)
    (tmp_path / "field.yaml").write_text(dump(cfg))
    results = tmp_path / "results.jsonl"
    args = ["--config", str(tmp_path / "field.yaml"), "--leave-out", "site-b", "--results", str(results)]
    out = run_job(["jobs/benchmark_field.py", *args])
    assert out.returncode == 0, out.stderr[-4000:]
    r = last_json(out.stdout)
    assert json.loads(results.read_text()) == r
    assert (r["left_out"], r["run"]) == ("site-b", "field-site-b-s3")
    art = Path(r["artifact"])
    meta = json.loads((art / "model.json").read_text())
    after = meta["metrics"]["after"]
    # trained on two sources, never on the left-out one; measured on all of it
    assert list(meta["data_stats"]["sources"]) == list(after["per_source"]["test"]) == [synth_data.name, "walls"]
    assert meta["data_stats"]["sources"]["walls"]["kind"] == "photos"
    assert r["left_out_all"]["n"] == 40 and list(r["test"]) == [synth_data.name, "walls"]
    tested = meta["data_stats"]["sources"]
    assert {n: e["n"] for n, e in r["test"].items()} == {
        n: sum(st["per_split"]["test"].values()) for n, st in tested.items()
    }
    # the threshold keeps every source's own validation target
    assert meta["target_recall_by_source"] == {"walls": 0.9}
    assert meta["threshold"] == min(after["threshold_by_source"].values())
    val = after["per_source"]["val"]
    assert val[synth_data.name]["recall"] >= cfg.target_recall and val["walls"]["recall"] >= 0.9
    # it learned on each source's held-out items (well above chance), and its loss fell
    assert all(e["roc_auc"] >= 0.75 for e in after["per_source"]["test"].values()), after["per_source"]["test"]
    losses = [h["loss"] for h in meta["history"]]
    assert min(losses[-3:]) < losses[0], losses
    preds = list(csv.DictReader(io.StringIO((art / "test_predictions.csv").read_text())))
    tiles = [row for row in preds if row["source"] == "walls"]
    assert tiles and all(sources.split_item_uri(row["uri"])[1] for row in tiles)
    page = (art / "report" / "index.html").read_text()
    assert "Test split, source by source" in page and 'id="test-walls-n"' in page
    bad = run_job(["jobs/benchmark_field.py", "--config", str(tmp_path / "field.yaml"), "--leave-out", "nope"])
    assert bad.returncode == 2 and "--leave-out 'nope' is not a source of the config" in bad.stderr
