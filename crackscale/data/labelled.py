"""Training sources → deduplicated, grouped, reproducible train/val/test split.

Steps: read every source (``data.sources``: crop trees file by file, photo sets as labelled tiles
on the scoring grid), SHA-256 each item, drop byte-identical duplicates across all sources (first
in config order wins; a hash seen under both classes is dropped as ambiguous), check each file
decodes, derive a group key (the source photo, or a proxy from the file name), then assign whole
groups to splits by a seeded hash, each source on its own, so near-duplicates never straddle
splits and every source has its own test split. The manifest (one row per kept item) and its
hash are recorded with every run and artifact.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from crackscale import storage
from crackscale.config.train import SourceConfig, TrainConfig, sources_of
from crackscale.data import sources
from crackscale.data.sources import DataError, check_image, group_key

__all__ = ["DataError", "check_image", "group_key", "Prepared", "scan", "assign_splits", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    """A split dataset ready for training: manifest rows and, per split, the items' encoded bytes,
    labels and source names."""

    manifest: list[dict[str, Any]]
    images: dict[str, list[bytes]] = field(repr=False)
    labels: dict[str, list[int]]
    manifest_hash: str
    stats: dict[str, Any]
    sources: dict[str, list[str]] = field(default_factory=dict)


def assign_splits(groups: dict[str, int], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Group → split for one class: groups in seeded-hash order fill test, then val, then train.

    Whole groups move together (near-duplicates never straddle splits); filling by image count
    keeps each class's split sizes close to the fractions, with at least one group in each of
    test (when test_fraction > 0), val and train whenever there are enough groups.
    """
    order = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    total = sum(groups.values())
    out: dict[str, str] = {}
    cum = 0
    targets = [("test", test_fraction * total), ("val", (test_fraction + val_fraction) * total)]
    for i, g in enumerate(order):
        split = "train"
        for name, limit in targets:
            if (name == "test" and test_fraction <= 0) or cum >= limit:
                continue
            split = name
            break
        if i == len(order) - 1 and "train" not in out.values():
            split = "train"
        out[g] = split
        cum += groups[g]
    return out


def source_size(rows: list[dict[str, Any]]) -> int:
    """The most common longer side of the crops (the crop size of a dataset cut from photos)."""
    sides = Counter(max(r["width"], r["height"]) for r in rows)
    return sides.most_common(1)[0][0] if sides else 0


def _facts(rows: list[dict[str, Any]], blobs: list[bytes]) -> None:
    """Sets ``sha256``, ``width``, ``height`` and ``reason`` of the rows that lack them (files;
    tiles come with theirs)."""
    for row, blob in zip(rows, blobs):
        if "sha256" in row:
            row.setdefault("reason", None)
            continue
        row["sha256"] = hashlib.sha256(blob).hexdigest()
        row["reason"], (row["width"], row["height"]) = check_image(blob)


def _dedupe(rows: list[dict[str, Any]]) -> tuple[list[int], dict[str, int]]:
    """Indices of the rows kept (first of each content hash, decodable, not under both classes),
    and how many were dropped for each reason; each row's drop reason goes in ``dropped``."""
    keep: list[int] = []
    first_by_hash: dict[str, int] = {}
    conflicts: set[str] = set()
    for i, row in enumerate(rows):
        digest = row["sha256"]
        if digest in first_by_hash:
            row["dropped"] = "duplicates_dropped"
            if rows[first_by_hash[digest]]["label"] != row["label"]:
                conflicts.add(digest)
            continue
        if row["reason"]:
            row["dropped"] = "undecodable_dropped"
            log.warning("skipping %s: %s", row["uri"], row["reason"])
            continue
        first_by_hash[digest] = i
        keep.append(i)
    for i in keep:
        if rows[i]["sha256"] in conflicts:
            rows[i]["dropped"] = "conflicting_labels_dropped"
    keep = [i for i in keep if rows[i]["sha256"] not in conflicts]
    dropped = Counter(r["dropped"] for r in rows if r.get("dropped"))
    return keep, {
        k: dropped.get(k, 0) for k in ("duplicates_dropped", "undecodable_dropped", "conflicting_labels_dropped")
    }


def _split(cfg: TrainConfig, srcs: tuple[SourceConfig, ...], rows: list[dict[str, Any]], keep: list[int]) -> None:
    """Sets each kept row's ``group`` and ``split``: whole groups per split, each source on its own;
    a crop tree's groups per class (each source photo was cropped into one class), a photo set's
    over all its tiles (a photo holds both)."""
    by_source = {s.label(): s for s in srcs}
    for i in keep:
        row = rows[i]
        if "group" not in row:
            src = by_source[row["source"]]
            key = group_key(
                storage.basename(row["uri"]), src.group_pattern or cfg.group_pattern, src.group_size or cfg.group_size
            )
            row["group"] = f"{row['class']}/{key}"
    parts: dict[tuple[str, str], list[int]] = {}
    for i in keep:
        row = rows[i]
        parts.setdefault((row["source"], "" if "x" in row else row["class"]), []).append(i)
    for members in parts.values():
        sizes: dict[str, int] = {}
        for i in members:
            sizes[rows[i]["group"]] = sizes.get(rows[i]["group"], 0) + 1
        split_of = assign_splits(sizes, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        for i in members:
            rows[i]["split"] = split_of[rows[i]["group"]]


def _counts(cfg: TrainConfig, manifest: list[dict[str, Any]], what: str) -> dict[str, dict[str, int]]:
    """Items per split and class; refuses a train or val split without both classes."""
    counts = {s: {c: 0 for c in cfg.class_names} for s in SPLITS}
    for row in manifest:
        counts[row["split"]][row["class"]] += 1
    check_counts(cfg, counts, len(manifest), what)
    return counts


def check_counts(cfg: TrainConfig, counts: dict[str, dict[str, int]], n: int, data_uri: str) -> None:
    """Refuses a train or val split without both classes (``n`` usable images in all)."""
    for s in ("train", "val"):
        for c in cfg.class_names:
            if counts[s][c] == 0:
                raise DataError(
                    f"split '{s}' has no '{c}' images ({n} usable images in {data_uri}); "
                    "add data or change val_fraction/test_fraction/group_size"
                )


def _read(
    cfg: TrainConfig, srcs: tuple[SourceConfig, ...], strict: bool
) -> tuple[list[dict[str, Any]], list[bytes], dict[str, Any]]:
    """Every source's items in config order, their bytes, and each source's own counts. Crop trees
    are read first: the tile side of photo sets is ``source_size``, else learned from the crops."""
    kinds = [sources.kind(s, cfg.storage) for s in srcs]
    got: dict[str, sources.Items] = {}
    for src, k in zip(srcs, kinds):
        if k == sources.CROPS:
            got[src.label()] = sources.read_crops(cfg, src, strict=strict)
            _facts(got[src.label()].rows, got[src.label()].blobs)
    side = cfg.source_size or source_size([r for it in got.values() for r in it.rows if not r["reason"]])
    if sources.PHOTOS in kinds and not side:
        raise DataError(
            "photo sets are cut into tiles of source_size pixels: "
            "set source_size, or add a crop source to learn it from"
        )
    seen: dict[str, str] = {}
    for src, k in zip(srcs, kinds):
        if k == sources.PHOTOS:
            got[src.label()] = sources.read_photos(cfg, src, side, seen)
            _facts(got[src.label()].rows, got[src.label()].blobs)
    rows = [r for s in srcs for r in got[s.label()].rows]
    blobs = [b for s in srcs for b in got[s.label()].blobs]
    return rows, blobs, {s.label(): {"uri": s.uri, **got[s.label()].stats} for s in srcs}


def _source_stats(
    cfg: TrainConfig, rows: list[dict[str, Any]], manifest: list[dict[str, Any]], per: dict[str, Any]
) -> dict[str, Any]:
    """Per source: what it gave (kind, photos, tiles left out), what was dropped, items per split and class."""
    for name, st in per.items():
        st["items"] = sum(1 for r in manifest if r["source"] == name)
        st["per_split"] = {s: {c: 0 for c in cfg.class_names} for s in SPLITS}
        for reason in ("duplicates_dropped", "undecodable_dropped", "conflicting_labels_dropped"):
            st[reason] = sum(1 for r in rows if r["source"] == name and r.get("dropped") == reason)
    for r in manifest:
        per[r["source"]]["per_split"][r["split"]][r["class"]] += 1
    return per


def scan(cfg: TrainConfig, data: str | tuple[SourceConfig, ...] | None = None) -> Prepared:
    """List, read, deduplicate, check and split the training sources (``data``: a URI or the
    sources; default the config's ``data``)."""
    srcs = cfg.data if data is None else sources_of(data)
    if not srcs:
        raise DataError("no training data: config key 'data' names no source")
    what = ", ".join(s.uri for s in srcs)
    rows, blobs, per = _read(cfg, srcs, strict=len(srcs) == 1)
    keep, dropped = _dedupe(rows)
    _split(cfg, srcs, rows, keep)
    manifest = [rows[i] for i in keep]
    images: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    labels: dict[str, list[int]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i in keep:
        images[rows[i]["split"]].append(blobs[i])
        labels[rows[i]["split"]].append(rows[i]["label"])
        names[rows[i]["split"]].append(rows[i]["source"])
    counts = _counts(cfg, manifest, what)
    stats = {
        "files": len(rows),
        **dropped,
        "images": len(manifest),
        "per_split": counts,
        "groups": len({(r["source"], r["group"]) for r in manifest}),
        "source_size": cfg.source_size or source_size([r for r in manifest if "x" not in r]),
        "sources": _source_stats(cfg, rows, manifest, per),
    }
    log.info("data: %s", json.dumps(stats))
    return Prepared(
        manifest=manifest,
        images=images,
        labels=labels,
        manifest_hash=manifest_hash(manifest),
        stats=stats,
        sources=names,
    )


def collect(
    cfg: TrainConfig, srcs: tuple[SourceConfig, ...]
) -> tuple[list[dict[str, Any]], list[bytes], dict[str, Any]]:
    """Every usable item of the sources, de-duplicated as ``scan`` does, unsplit (what ``crackscale
    evaluate`` scores): the rows, their bytes and each source's counts. A source may hold one class."""
    if not srcs:
        raise DataError("no data: name at least one source")
    rows, blobs, per = _read(cfg, srcs, strict=False)
    keep, _ = _dedupe(rows)
    _source_stats(cfg, rows, [dict(rows[i], split="test") for i in keep], per)
    return [rows[i] for i in keep], [blobs[i] for i in keep], per


def manifest_hash(manifest: list[dict[str, Any]]) -> str:
    """SHA-256 over (split, label, content hash) rows: same data + same split ⇒ same hash."""
    h = hashlib.sha256()
    for r in sorted(manifest, key=lambda r: (r["split"], r["sha256"])):
        h.update(f"{r['split']},{r['label']},{r['sha256']}\n".encode())
    return h.hexdigest()


def manifest_csv(manifest: list[dict[str, Any]]) -> str:
    """The manifest as CSV (``csv`` quoting: a URI with quotes, commas or newlines reads back as is):
    ``MANIFEST_COLUMNS``, then ``SOURCE_COLUMNS`` (a tile's window; 0 for a whole file)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS + SOURCE_COLUMNS)
    w.writerows([r[c] for c in MANIFEST_COLUMNS] + [r.get(c, 0) for c in SOURCE_COLUMNS] for r in manifest)
    return buf.getvalue()


MANIFEST_COLUMNS = ("uri", "class", "label", "sha256", "group", "split")
SOURCE_COLUMNS = ("source", "x", "y", "w", "h")
