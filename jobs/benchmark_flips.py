"""Test-time flip averaging, measured (printed, not asserted): does averaging a trained model's
probabilities over mirrored views of each image fix its test errors, and at what scoring cost?

    python jobs/benchmark_flips.py runs/<run>/model

The artifact's own validation and test splits (its ``manifest.csv``), decoded as in training;
for 1 view (as trained), 2 (+ left-right mirror) and 4 (+ upside down, + both): the threshold for
the artifact's ``target_recall`` picked on the averaged validation probabilities, then test
accuracy, recall and every wrong image with its probability. One JSON line per row, then a
summary line. The cost is the number of views: each is one more model evaluation per image.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout / working_dir
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VIEWS = {1: ("as is",), 2: ("as is", "mirrored"), 4: ("as is", "mirrored", "upside down", "both")}


def view_probabilities(model: Any, meta: dict, uris: list[str], storage_cfg: Any) -> dict[str, Any]:
    """P(crack) of every image under each of the four views, decoded as the model was trained."""
    import numpy as np
    import tensorflow as tf

    from crackscale.data.sources import read_items
    from crackscale.imaging.tfdecode import decode_uint8

    fn = tf.function(lambda x: model(x, training=False))
    flips = {"as is": lambda x: x, "mirrored": lambda x: x[:, :, ::-1], "upside down": lambda x: x[:, ::-1]}
    flips["both"] = lambda x: x[:, ::-1, ::-1]
    out: dict[str, list] = {v: [] for v in flips}
    for i in range(0, len(uris), 64):
        blobs = read_items(uris[i : i + 64], storage_cfg)  # files, or tiles of photos (#x,y,w,h)
        size, antialias = meta["image_size"], bool(meta.get("resize_antialias"))
        # the training pipeline's pixels: decoded, resized, rounded to uint8
        x = tf.cast(tf.stack([decode_uint8(b, size, antialias) for b in blobs]), tf.float32)
        for v, flip in flips.items():
            out[v].append(fn(flip(x)).numpy().reshape(-1))
    return {v: np.concatenate(p) if p else np.zeros(0) for v, p in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="a model artifact (local or s3://) written by jobs/train.py")
    args = ap.parse_args()

    import numpy as np

    from crackscale import artifact, storage
    from crackscale import model as M
    from crackscale.config.storage import StorageConfig

    storage_cfg = StorageConfig()
    loaded = artifact.load(args.artifact, storage_cfg)
    meta = loaded.meta
    manifest = storage.read_text(storage.join(args.artifact, "manifest.csv"), storage_cfg)
    rows = list(csv.DictReader(io.StringIO(manifest)))
    split = {s: [r for r in rows if r["split"] == s] for s in ("val", "test")}
    y = {s: np.array([int(r["label"]) for r in split[s]]) for s in split}
    p = {s: view_probabilities(loaded.model, meta, [r["uri"] for r in split[s]], storage_cfg) for s in split}
    target = float(meta.get("target_recall", 0.99))
    results = []
    for n, views in VIEWS.items():
        pv, pt = (np.mean([p[s][v] for v in views], axis=0) for s in ("val", "test"))
        thr = M.threshold_for_recall(y["val"], pv, target)
        m = M.metrics(y["test"], pt, thr)
        wrong = np.flatnonzero((pt >= thr) != (y["test"] == 1))
        row = {
            "views": n,
            "model_evaluations_per_image": n,
            "threshold": round(thr, 4),
            "test_accuracy": m["accuracy"],
            "test_recall": m["recall"],
            "wrong": [
                {"uri": split["test"][i]["uri"], "label": int(y["test"][i]), "p": round(float(pt[i]), 4)} for i in wrong
            ],
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    print(json.dumps({"target_recall": target, "test_images": len(y["test"]), "rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
