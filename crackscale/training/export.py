"""Exports added to an existing model artifact: ``crackscale export --int8 ARTIFACT`` calibrates a
full-integer LiteRT model on the artifact's own training images and measures it on its validation
split, both named by the artifact's ``manifest.csv``."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from crackscale import artifact, storage
from crackscale.config.loader import ConfigError, from_dict
from crackscale.config.storage import StorageConfig
from crackscale.config.train import TrainConfig
from crackscale.data import sources
from crackscale.training.inputs import decoded, measured, representative


def _read(uri: str, cfg: StorageConfig | None) -> bytes:
    try:
        return sources.read_items([uri], cfg)[0]
    except (OSError, storage.StorageError, sources.DataError) as e:
        raise ConfigError(
            f"cannot read {uri}, named in the artifact's manifest.csv ({e}): the int8 export is calibrated "
            "and measured on the images the model was trained on"
        ) from None


def add_int8(uri: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Add the int8 export to the artifact at ``uri``; returns its record and whether ``runtime:
    auto`` will choose it."""
    meta = artifact.read_meta(uri, cfg)
    train_cfg = from_dict(TrainConfig, meta.get("config") or {})
    try:
        text = storage.read_text(storage.join(uri, "manifest.csv"), cfg)
    except (OSError, storage.StorageError) as e:
        raise artifact.ArtifactError(f"artifact {uri} has no manifest.csv to find its training images: {e}") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val")}
    if not split["train"] or not split["val"]:
        raise artifact.ArtifactError(f"artifact {uri}: manifest.csv names no training or no validation images")
    tr_uris = representative(
        [r["uri"] for r in split["train"]], [int(r["label"]) for r in split["train"]], train_cfg.seed
    )
    val = split["val"]
    val_uris, val_y = measured([r["uri"] for r in val], [int(r["label"]) for r in val], train_cfg.seed)
    val_names, _ = measured([r.get("source", "") for r in val], [0] * len(val), train_cfg.seed)  # the same picks
    data = artifact.Int8Data(
        decoded(train_cfg, [_read(u, cfg) for u in tr_uris]),
        decoded(train_cfg, [_read(u, cfg) for u in val_uris]),
        np.array(val_y),
        val_names,
    )
    record = artifact.add_int8(uri, data, cfg)
    if record.get("error"):
        raise artifact.ArtifactError(f"int8 export of {uri} failed: {record['error']}")
    chosen, why = artifact.int8_qualifies({"litert_int8": record})
    return {"artifact": uri, "litert_int8": record, "runtime_auto_uses_int8": chosen, "because": why}
