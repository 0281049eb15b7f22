"""``crackscale evaluate``: a model artifact measured on labelled sources, source by source.

Each source (a crop tree or a photo set with masks, as in training) is read with the artifact's
own data settings: class names, the tile side it learned (``source_size``) and its tile grid and
mask rules, so a photo set gives the tiles scoring would cut and the labels training would give
them. Every item is then decoded and resized as scoring does it, scored by the runtime scoring
would choose (``scoring.predictor.Predictor``: int8 when its measured quality holds), and judged at
that runtime's threshold. ``split`` keeps only the items the artifact's manifest put in one split
(``test``: the honest figure for a source it trained on); ``all`` takes every item (a source it
never saw, e.g. one left out of training).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from typing import Any

import numpy as np

from crackscale import artifact, storage
from crackscale import model as M
from crackscale.config.loader import ConfigError, from_dict, to_dict
from crackscale.config.score import ScoreConfig
from crackscale.config.storage import StorageConfig
from crackscale.config.train import SourceConfig, TrainConfig, sources_of
from crackscale.data import labelled, sources
from crackscale.imaging import photo

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("all", "train", "val", "test")


def data_config(meta: dict[str, Any], srcs: tuple[SourceConfig, ...], cfg: StorageConfig | None) -> TrainConfig:
    """The artifact's training config with ``srcs`` as its data: its classes, tile side, grid and
    mask rules read the new sources as training read its own."""
    if not meta.get("config"):
        raise artifact.ArtifactError("the artifact's model.json has no training config to read sources with")
    base = dict(meta["config"])
    base.update(
        data=[to_dict(s) for s in srcs],
        limit_per_class=0,
        source_size=int(meta.get("source_size") or base.get("source_size") or 0),
        storage=to_dict(cfg or StorageConfig()),
    )
    return from_dict(TrainConfig, base)


def _split_of(model_uri: str, cfg: StorageConfig | None) -> dict[str, str]:
    """Item URI → split, from the artifact's manifest.csv."""
    try:
        text = storage.read_text(storage.join(model_uri, "manifest.csv"), cfg)
    except (OSError, storage.StorageError) as e:
        raise artifact.ArtifactError(f"artifact {model_uri} has no manifest.csv to find its splits: {e}") from None
    return {r["uri"]: r["split"] for r in csv.DictReader(io.StringIO(text))}


def pixels(blob: bytes, image_size: int, antialias: bool) -> np.ndarray:
    """An item's bytes as the model input, decoded and resized as scoring does (uint8 HWC)."""
    return photo.resize(photo.decode_file(blob), image_size, antialias)


def predict(runtime: Any, blobs: list[bytes], image_size: int, antialias: bool, batch: int = 256) -> np.ndarray:
    """P(crack) of each item, ``batch`` decoded items at a time."""
    out = []
    for i in range(0, len(blobs), batch):
        x = np.stack([pixels(b, image_size, antialias) for b in blobs[i : i + batch]]).astype(np.float32)
        out.append(np.asarray(runtime.predict(x), dtype=np.float64).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(
    model_uri: str,
    data: str | tuple[SourceConfig, ...] | list[str],
    split: str = "all",
    runtime: str = "auto",
    cfg: StorageConfig | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the summary: a per-source table at the runtime's threshold, and the items with their
    probability, label and source, for the report)."""
    from crackscale.scoring.predictor import Predictor

    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    srcs = sources_of(",".join(data) if isinstance(data, list) else data)
    if not srcs:
        raise ConfigError("evaluate: name at least one source with --data")
    t0 = time.perf_counter()
    meta = artifact.read_meta(model_uri, cfg)
    train_cfg = data_config(meta, srcs, cfg)
    rows, blobs, per = labelled.collect(train_cfg, train_cfg.data)
    if split != "all":
        split_of = _split_of(model_uri, cfg)
        keep = [i for i, r in enumerate(rows) if split_of.get(r["uri"]) == split]
        if not keep:
            raise ConfigError(
                f"no item of {', '.join(s.uri for s in srcs)} is in the artifact's {split} split: "
                "use --split all for a source it did not train on"
            )
        rows, blobs = [rows[i] for i in keep], [blobs[i] for i in keep]
    predictor = Predictor(ScoreConfig(model=model_uri, runtime=runtime, storage=cfg or StorageConfig()))
    threshold = predictor.threshold
    p = predict(predictor.runtime, blobs, int(meta["image_size"]), bool(meta.get("resize_antialias", True)))
    y = np.array([r["label"] for r in rows], dtype=int)
    names = [r["source"] for r in rows]
    table = M.source_table(y, p, names, threshold)
    for name, entry in table.items():
        entry["kind"] = per[name]["kind"]
        entry["uri"] = per[name]["uri"]
        if per[name]["kind"] == sources.PHOTOS:
            entry["photos"] = per[name]["photos"]
            entry["tiles_left_out"] = per[name]["tiles_left_out"]
    items = [
        {"uri": r["uri"], "source": r["source"], "label": int(r["label"]), "probability": float(pr)}
        for r, pr in zip(rows, p)
    ]
    summary = {
        "model": model_uri,
        "model_id": str(meta.get("model_sha256", ""))[:16],
        "runtime": predictor.runtime.name,
        "threshold": threshold,
        "split": split,
        "items": len(items),
        "sources": table,
        "all": M.source_table(y, p, ["all"] * len(y), threshold)["all"] if len(y) else {},
        "duration_s": round(time.perf_counter() - t0, 1),
    }
    log.info("evaluated %d items of %d sources in %.1f s", len(items), len(table), summary["duration_s"])
    return summary, items
