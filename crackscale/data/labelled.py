"""Labelled image tree → deduplicated, grouped, reproducible train/val/test split.

Steps: list ``<data>/<class>/*`` (local or S3), read bytes, SHA-256, drop byte-identical
duplicates (first by path wins; a hash seen under both classes is dropped as ambiguous), check each
file decodes, derive a group key from the file name (source-photo proxy), then assign whole groups
to splits by a seeded hash so near-duplicates never straddle splits. The manifest (one row per
kept image) and its hash are recorded with every run and artifact.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from crackscale import storage
from crackscale.config.train import TrainConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """The training data is missing, empty or unusable; the message names the path."""


@dataclass
class Prepared:
    """A split dataset ready for training: manifest rows and image bytes per split."""

    manifest: list[dict[str, Any]]
    images: dict[str, list[bytes]] = field(repr=False)
    labels: dict[str, list[int]]
    manifest_hash: str
    stats: dict[str, Any]


def group_key(name: str, pattern: str, group_size: int) -> str:
    """Source-photo key of a file name: the regex's group 1, numeric keys bucketed by group_size."""
    m = re.search(pattern, name)
    if not m:
        return name  # no key: the image is its own group
    key = m.group(1) if m.groups() else m.group(0)
    if key.isdigit():
        return f"n{(int(key) - 1) // group_size}"
    return key


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


def check_image(data: bytes) -> tuple[str | None, tuple[int, int]]:
    """(None, (width, height)) if ``data`` looks like a decodable image, else (the reason, (0, 0))."""
    if not data:
        return "empty file", (0, 0)
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"not a decodable image: {e}", (0, 0)
    return None, size


def source_size(rows: list[dict[str, Any]]) -> int:
    """The most common longer side of the images (the crop size of a dataset cut from photos)."""
    sides = Counter(max(r["width"], r["height"]) for r in rows)
    return sides.most_common(1)[0][0] if sides else 0


def _read(cfg: TrainConfig, data_uri: str) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Every file of every class folder: its row (uri, class, label) and its bytes."""
    if not storage.exists(data_uri, cfg.storage):
        raise DataError(f"data path not found: {data_uri}")
    rows: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for cls in cfg.class_names:
        cls_uri = storage.join(data_uri, cls)
        if not storage.exists(cls_uri, cfg.storage):
            raise DataError(f"class folder missing: {cls_uri} (class_names = {list(cfg.class_names)})")
        files = list(storage.list_files(cls_uri, cfg.extensions, cfg.storage))
        if cfg.limit_per_class:
            files = files[: cfg.limit_per_class]
        if not files:
            raise DataError(f"class folder is empty: {cls_uri} (no files ending in {', '.join(cfg.extensions)})")
        uris = [storage.uri_of(data_uri, f.path) for f in files]
        for uri, blob in zip(uris, storage.read_many(uris, cfg.storage)):
            # label 1 = the crack class, so the model's sigmoid is P(crack) whatever the order
            rows.append({"uri": uri, "class": cls, "label": int(cls == cfg.crack_class)})
            blobs.append(blob)
        log.info("class %s: %d files under %s", cls, len(files), cls_uri)
    return rows, blobs


def _dedupe(rows: list[dict[str, Any]], blobs: list[bytes]) -> tuple[list[int], dict[str, int]]:
    """Indices of the rows kept (first of each content hash, decodable, not under both classes),
    and how many were dropped for each reason. Sets each row's ``sha256``."""
    keep: list[int] = []
    first_by_hash: dict[str, int] = {}
    conflicts: set[str] = set()
    dup = bad = 0
    for i, (row, blob) in enumerate(zip(rows, blobs)):
        digest = hashlib.sha256(blob).hexdigest()
        row["sha256"] = digest
        if digest in first_by_hash:
            dup += 1
            if rows[first_by_hash[digest]]["label"] != row["label"]:
                conflicts.add(digest)
            continue
        reason, (row["width"], row["height"]) = check_image(blob)
        if reason:
            bad += 1
            log.warning("skipping %s: %s", row["uri"], reason)
            continue
        first_by_hash[digest] = i
        keep.append(i)
    keep = [i for i in keep if rows[i]["sha256"] not in conflicts]
    return keep, {"duplicates_dropped": dup, "undecodable_dropped": bad, "conflicting_labels_dropped": len(conflicts)}


def _split(cfg: TrainConfig, rows: list[dict[str, Any]], keep: list[int]) -> None:
    """Sets each kept row's ``group`` and ``split`` (whole groups per split, per class)."""
    for i in keep:
        row = rows[i]
        # the group key includes the class: each source photo was cropped into one class
        row["group"] = f"{row['class']}/{group_key(storage.basename(row['uri']), cfg.group_pattern, cfg.group_size)}"
    for cls in cfg.class_names:
        sizes: dict[str, int] = {}
        for i in keep:
            if rows[i]["class"] == cls:
                sizes[rows[i]["group"]] = sizes.get(rows[i]["group"], 0) + 1
        split_of = assign_splits(sizes, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        for i in keep:
            if rows[i]["class"] == cls:
                rows[i]["split"] = split_of[rows[i]["group"]]


def _counts(cfg: TrainConfig, manifest: list[dict[str, Any]], data_uri: str) -> dict[str, dict[str, int]]:
    """Images per split and class; refuses a train or val split without both classes."""
    counts = {s: {c: 0 for c in cfg.class_names} for s in SPLITS}
    for row in manifest:
        counts[row["split"]][row["class"]] += 1
    check_counts(cfg, counts, len(manifest), data_uri)
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


def scan(cfg: TrainConfig, data_uri: str) -> Prepared:
    """List, read, deduplicate, check and split the labelled tree at ``data_uri``."""
    rows, blobs = _read(cfg, data_uri)
    keep, dropped = _dedupe(rows, blobs)
    _split(cfg, rows, keep)
    manifest = [rows[i] for i in keep]
    images: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    labels: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i in keep:
        images[rows[i]["split"]].append(blobs[i])
        labels[rows[i]["split"]].append(rows[i]["label"])
    counts = _counts(cfg, manifest, data_uri)
    stats = {
        "files": len(rows),
        **dropped,
        "images": len(manifest),
        "per_split": counts,
        "groups": len({r["group"] for r in manifest}),
        "source_size": source_size(manifest),
    }
    log.info("data: %s", json.dumps(stats))
    return Prepared(manifest=manifest, images=images, labels=labels, manifest_hash=manifest_hash(manifest), stats=stats)


def manifest_hash(manifest: list[dict[str, Any]]) -> str:
    """SHA-256 over (split, label, content hash) rows: same data + same split ⇒ same hash."""
    h = hashlib.sha256()
    for r in sorted(manifest, key=lambda r: (r["split"], r["sha256"])):
        h.update(f"{r['split']},{r['label']},{r['sha256']}\n".encode())
    return h.hexdigest()


def manifest_csv(manifest: list[dict[str, Any]]) -> str:
    """The manifest as CSV (``csv`` quoting: a URI with quotes, commas or newlines reads back as is)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    w.writerows([r[c] for c in MANIFEST_COLUMNS] for r in manifest)
    return buf.getvalue()


MANIFEST_COLUMNS = ("uri", "class", "label", "sha256", "group", "split")
