"""Labelled data for Ray Data ingest (``ingest: ray_data``): the driver never holds image bytes.

The driver lists ``<data>/<class>/*`` and keeps one small row per file in a pyarrow table; Ray
Data tasks, wherever the cluster has CPUs, read each file, hash it and check it decodes, and send
back only (index, sha256, width, height, reason). De-duplication and the grouped split then run on
those columns with the rules of ``labelled.scan``, so the same files give the same manifest and
manifest hash. For training, each split becomes a Ray Data dataset of (uri, label) rows whose
decode + resize to the model input also runs in Ray Data tasks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.config.train import TrainConfig
from crackscale.data.labelled import (
    MANIFEST_COLUMNS,
    SPLITS,
    DataError,
    assign_splits,
    check_counts,
    check_image,
    group_key,
)

log = logging.getLogger(__name__)

FACTS_BLOCK = (500, 4000)  # files per hashing task: at least 4 tasks per CPU, within these bounds


@dataclass
class Index:
    """The split dataset as small rows: ``table`` has one row per kept image (MANIFEST_COLUMNS plus
    width and height), in listing order."""

    table: pa.Table
    manifest_hash: str
    stats: dict[str, Any]

    def split(self, name: str) -> pa.Table:
        return self.table.filter(pc.equal(self.table["split"], name))


def listing(cfg: TrainConfig, data_uri: str) -> pa.Table:
    """(idx, uri, class, label) of every file of every class folder, in the order ``labelled.scan``
    reads them (class by class, sorted by path)."""
    if not storage.exists(data_uri, cfg.storage):
        raise DataError(f"data path not found: {data_uri}")
    parts = []
    for cls in cfg.class_names:
        cls_uri = storage.join(data_uri, cls)
        if not storage.exists(cls_uri, cfg.storage):
            raise DataError(f"class folder missing: {cls_uri} (class_names = {list(cfg.class_names)})")
        listed = storage.iter_uris(cls_uri, cfg.extensions, cfg.storage)
        if cfg.limit_per_class:
            listed = itertools.islice(listed, cfg.limit_per_class)
        # arrow chunks as the listing streams: no list of a million Python strings
        uris = pa.chunked_array(
            [pa.array(chunk, pa.string()) for chunk in iter(lambda: list(itertools.islice(listed, 65536)), [])],
            pa.string(),
        )
        if not len(uris):
            raise DataError(f"class folder is empty: {cls_uri} (no files ending in {', '.join(cfg.extensions)})")
        n = len(uris)
        parts.append(
            pa.table(
                {
                    "uri": uris,
                    "class": pa.repeat(pa.scalar(cls, pa.string()), n),
                    # label 1 = the crack class, so the model's sigmoid is P(crack) whatever the order
                    "label": pa.array(np.full(n, int(cls == cfg.crack_class), np.int8)),
                }
            )
        )
        log.info("class %s: %d files under %s", cls, n, cls_uri)
    t = pa.concat_tables(parts).combine_chunks()
    return t.add_column(0, "idx", pa.array(np.arange(len(t), dtype=np.int64)))


def file_facts(batch: pa.Table, storage_cfg: dict[str, Any]) -> pa.Table:
    """Ray Data task: read a batch of files; (idx, sha256, width, height, reason) per file, no bytes."""
    from crackscale.config.loader import from_dict

    cfg = from_dict(StorageConfig, storage_cfg)
    uris = batch["uri"].to_pylist()
    sha, width, height, reason = [], [], [], []
    for blob in storage.read_many(uris, cfg):
        sha.append(hashlib.sha256(blob).digest())  # 32 bytes, not 64 hex characters, per row
        why, (w, h) = check_image(blob)
        width.append(w)
        height.append(h)
        reason.append(why)
    return pa.table(
        {
            "idx": batch["idx"],
            "sha256": pa.array(sha, pa.binary()),
            "width": pa.array(width, pa.int32()),
            "height": pa.array(height, pa.int32()),
            "reason": pa.array(reason, pa.string()),
        }
    )


def facts(cfg: TrainConfig, files: pa.Table) -> pa.Table:
    """``files`` with sha256/width/height/reason added, computed in Ray Data tasks (needs Ray)."""
    import ray
    from ray.data import from_arrow_refs

    from crackscale.config.loader import to_dict

    n = len(files)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = min(FACTS_BLOCK[1], max(FACTS_BLOCK[0], -(-n // (4 * cpus))))
    blocks = [ray.put(files.select(["idx", "uri"]).slice(i, size)) for i in range(0, n, size)]
    ds = from_arrow_refs(blocks).map_batches(
        file_facts, batch_format="pyarrow", batch_size=None, fn_kwargs={"storage_cfg": to_dict(cfg.storage)}
    )
    refs = ds.to_arrow_refs()
    del blocks, ds  # the inputs' object-store copies go as soon as the facts exist
    got = pa.concat_tables(ray.get(refs))
    got = got.take(pc.sort_indices(got["idx"]))  # a copy out of the object store
    del refs
    if len(got) != n or not pc.all(pc.equal(got["idx"], files["idx"])).as_py():
        raise RuntimeError(f"hashing returned {len(got)} rows for {n} files")
    return (
        files.append_column("sha256", got["sha256"])
        .append_column("width", got["width"])
        .append_column("height", got["height"])
        .append_column("reason", got["reason"])
    )


def dedupe(t: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Rows kept and the drop counts, by ``labelled``'s rules: the first file (listing order) of
    each content hash wins; undecodable files are dropped (every copy: the check is on the bytes);
    a hash seen under both classes is dropped entirely."""
    bad = pc.is_valid(t["reason"])
    skipped = t.filter(bad)
    for uri, why in zip(skipped["uri"].to_pylist(), skipped["reason"].to_pylist()):
        log.warning("skipping %s: %s", uri, why)
    good = t.select(["idx", "sha256", "label"]).filter(pc.invert(bad))
    # one thread: arrow's per-thread allocator arenas would outweigh these few columns
    g = good.group_by("sha256", use_threads=False).aggregate([("idx", "min"), ("label", "count_distinct")])
    conflicting = pc.greater(g["label_count_distinct"], 1)
    first = g.filter(pc.invert(conflicting))["idx_min"]
    kept = t.filter(pc.is_in(t["idx"], value_set=first))
    dropped = {
        "duplicates_dropped": len(good) - len(g),
        "undecodable_dropped": int(pc.sum(bad).as_py() or 0),
        "conflicting_labels_dropped": int(pc.sum(conflicting).as_py() or 0),
    }
    return kept, dropped


def split(cfg: TrainConfig, t: pa.Table) -> pa.Table:
    """``t`` with ``group`` and ``split`` columns (whole groups per split, per class). Group keys
    are computed a batch at a time into arrow arrays: no list of every URI as Python strings."""
    groups = []
    sizes: dict[str, Counter] = {c: Counter() for c in cfg.class_names}
    for batch in t.select(["class", "uri"]).to_batches(65536):
        keys = [
            f"{c}/{group_key(storage.basename(u), cfg.group_pattern, cfg.group_size)}"
            for c, u in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
        ]
        for c, k in zip(batch.column(0).to_pylist(), keys):
            sizes[c][k] += 1
        groups.append(pa.array(keys, pa.string()))
    group = pa.chunked_array(groups, pa.string())
    split_of: dict[str, str] = {}
    for cls in cfg.class_names:
        split_of.update(assign_splits(dict(sizes[cls]), cfg.seed, cfg.val_fraction, cfg.test_fraction))
    names = pa.array(list(split_of), pa.string())
    splits = pc.take(pa.array(list(split_of.values()), pa.string()), pc.index_in(group, value_set=names))
    return t.append_column("group", group).append_column("split", splits)


def manifest_hash(t: pa.Table) -> str:
    """``labelled.manifest_hash`` over a table: SHA-256 of (split, label, sha256) lines sorted by
    (split, sha256)."""
    s = t.select(["split", "label", "sha256"]).cast(
        pa.schema([("split", pa.string()), ("label", pa.int8()), ("sha256", pa.binary())])
    )
    # raw digests sort as their hex spellings do
    s = s.sort_by([("split", "ascending"), ("sha256", "ascending")])
    h = hashlib.sha256()
    for batch in s.to_batches(65536):
        for sp, y, d in zip(*(batch.column(i).to_pylist() for i in range(3))):
            h.update(f"{sp},{y},{d.hex()}\n".encode())
    return h.hexdigest()


def manifest_csv(t: pa.Table) -> str:
    """``labelled.manifest_csv`` of the table (the same columns, the same ``csv`` quoting)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    cols = t.select(list(MANIFEST_COLUMNS))
    sha = MANIFEST_COLUMNS.index("sha256")
    for batch in cols.to_batches(65536):
        columns = [batch.column(i).to_pylist() for i in range(len(MANIFEST_COLUMNS))]
        columns[sha] = [d.hex() for d in columns[sha]]
        w.writerows(zip(*columns))
    return buf.getvalue()


def scan(cfg: TrainConfig, data_uri: str) -> Index:
    """List in the driver, hash and check in Ray Data, de-duplicate and split: the ``Index``."""
    files = facts(cfg, listing(cfg, data_uri))
    kept, dropped = dedupe(files)
    t = split(cfg, kept.drop_columns(["reason"]))
    counts = {
        s: {
            c: int(pc.sum(pc.and_(pc.equal(t["split"], s), pc.equal(t["class"], c))).as_py() or 0)
            for c in cfg.class_names
        }
        for s in SPLITS
    }
    check_counts(cfg, counts, len(t), data_uri)
    sides = Counter(np.maximum(t["width"].to_numpy(), t["height"].to_numpy()).tolist())
    stats = {
        "files": len(files),
        **dropped,
        "images": len(t),
        "per_split": counts,
        "groups": len(pc.unique(t["group"])),
        "source_size": sides.most_common(1)[0][0] if sides else 0,
    }
    log.info("data: %s", stats)
    return Index(table=t, manifest_hash=manifest_hash(t), stats=stats)
