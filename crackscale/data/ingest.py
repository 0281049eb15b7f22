"""Labelled data for Ray Data ingest (``ingest: ray_data``): the driver never holds image bytes.

The driver lists ``<data>/<class>/*`` and keeps one small row per file in a pyarrow table; Ray
Data tasks, wherever the cluster has CPUs, read each file, hash it and check it decodes, and send
back only (index, sha256, width, height, reason). De-duplication and the grouped split then run on
those columns with the rules of ``labelled.scan``, so the same files give the same manifest and
manifest hash. For training, each split becomes a Ray Data dataset of (uri, label) rows whose
decode + resize to the model input also runs in Ray Data tasks.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.config.train import SourceConfig, TrainConfig
from crackscale.data.labelled import (
    MANIFEST_COLUMNS,
    SOURCE_COLUMNS,
    SPLITS,
    DataError,
    assign_splits,
    check_counts,
    check_image,
    group_key,
)

log = logging.getLogger(__name__)

ROW_BATCH = 8192  # rows turned into Python objects at a time (group keys, manifest lines)
FACTS_BLOCK = (500, 4000)  # files per hashing task: at least 4 tasks per CPU, within these bounds


@dataclass
class Index:
    """The split dataset as small rows: ``table`` has one row per kept image (MANIFEST_COLUMNS plus
    width and height), in listing order."""

    table: pa.Table
    manifest_hash: str
    stats: dict[str, Any]
    source: str = ""  # the one source's name (the manifest's source column)

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
        uris = pa.chunked_array(list(storage.iter_uri_batches(cls_uri, cfg.extensions, cfg.storage)), pa.string())
        if cfg.limit_per_class:
            uris = uris.slice(0, cfg.limit_per_class)
        if not len(uris):
            raise DataError(f"class folder is empty: {cls_uri} (no files ending in {', '.join(cfg.extensions)})")
        n = len(uris)
        parts.append(
            pa.table(
                {
                    "uri": uris,
                    # a byte per row, not the name: arrow compares and prints it as the name
                    "class": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([cls])),
                    # label 1 = the crack class, so the model's sigmoid is P(crack) whatever the order
                    "label": pa.array(np.full(n, int(cls == cfg.crack_class), np.int8)),
                }
            )
        )
        log.info("class %s: %d files under %s", cls, n, cls_uri)
    t = pa.concat_tables(parts)
    return t.add_column(0, "idx", pa.array(np.arange(len(t), dtype=np.int32)))


def file_facts(batch: pa.Table, prefix: str, storage_cfg: dict[str, Any]) -> pa.Table:
    """Ray Data task: read a batch of files, each ``prefix + name``; (idx, sha256, width, height,
    reason) per file, no bytes."""
    from crackscale.config.loader import from_dict

    cfg = from_dict(StorageConfig, storage_cfg)
    uris = [prefix + name for name in batch["name"].to_pylist()]
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
    # the tasks get each URI less the prefix all share: the driver writes a fifth of the bytes
    # into the object store
    bounds = pc.min_max(files["uri"]).as_py() if n else {"min": "", "max": ""}
    prefix = os.path.commonprefix([bounds["min"], bounds["max"]])
    names = pa.table({"idx": files["idx"], "name": pc.utf8_slice_codeunits(files["uri"], len(prefix))})
    blocks = [ray.put(names.slice(i, size)) for i in range(0, n, size)]
    del names
    ds = from_arrow_refs(blocks).map_batches(
        file_facts,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"prefix": prefix, "storage_cfg": to_dict(cfg.storage)},
    )
    refs = ds.to_arrow_refs()
    del blocks, ds  # the inputs' object-store copies go as soon as the facts exist
    # each task keeps its block's row order: ordering the blocks orders the rows, and the
    # concatenation reads them where they are instead of copying
    got = pa.concat_tables(sorted(ray.get(refs), key=lambda b: b["idx"][0].as_py() if len(b) else -1))
    del refs
    if len(got) != n:
        raise RuntimeError(f"hashing returned {len(got)} rows for {n} files")
    if not pc.all(pc.equal(got["idx"], files["idx"])).as_py():
        got = got.take(pc.sort_indices(got["idx"]))
    return (
        files.append_column("sha256", got["sha256"])
        .append_column("width", got["width"])
        .append_column("height", got["height"])
        .append_column("reason", got["reason"])
    )


def digest_words(digests: pa.Array) -> np.ndarray:
    """32-byte digests as an (n, 4) array of 64-bit words: a view of the array's own bytes (in
    the object store, for hashing results), not a copy."""
    n = len(digests)
    offsets = np.frombuffer(digests.buffers()[1], np.int32, n + 1, 4 * digests.offset)
    if digests.null_count or (n and (offsets[n] - offsets[0] != 32 * n or np.any(np.diff(offsets) != 32))):
        raise ValueError("sha256 column: every value must be a 32-byte digest")
    return np.frombuffer(digests.buffers()[2] or b"", np.uint64, 4 * n, int(offsets[0])).reshape(n, 4)


def digest_groups(digests: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): ``order`` lists the positions sorted by digest (byte order, which is hex
    order), equal digests in ascending position; ``starts`` are the indices into ``order`` where
    a group of equal digests begins.

    Sorted on the first 8 bytes as a big-endian number (8 bytes a row, where sorting whole digests
    would copy 32); only runs whose first words tie, almost always true duplicates, are sorted on
    all four words."""
    w0 = np.concatenate([np.empty(0, np.uint64)] + [digest_words(c)[:, 0].byteswap() for c in digests.chunks])
    order = np.argsort(w0, kind="stable")
    w0 = w0[order]
    tie = np.zeros(len(order), bool)  # sorted row i has the first word of row i - 1
    tie[1:] = w0[1:] == w0[:-1]
    del w0
    first = ~tie
    members = np.flatnonzero(tie | np.r_[tie[1:], False])  # the rows of runs of tied first words
    if len(members):
        words = digest_words(digests.take(pa.array(order[members])).combine_chunks()).byteswap()
        run = np.cumsum(~tie[members])
        local = np.lexsort((*words.T[::-1], run))  # stable: equal digests keep ascending positions
        order[members] = order[members][local]
        words, run = words[local], run[local]
        first[members[1:]] = (run[1:] != run[:-1]) | (words[1:] != words[:-1]).any(axis=1)
    return order, np.flatnonzero(first)


def dedupe(t: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Rows kept and the drop counts, by ``labelled``'s rules: the first file (listing order) of
    each content hash wins; undecodable files are dropped (every copy: the check is on the bytes);
    a hash seen under both classes is dropped entirely."""
    bad = pc.is_valid(t["reason"]).to_numpy(zero_copy_only=False)
    n_bad = int(bad.sum())
    digests = t["sha256"]
    if n_bad:
        skipped = t.filter(pa.array(bad))
        for uri, why in zip(skipped["uri"].to_pylist(), skipped["reason"].to_pylist()):
            log.warning("skipping %s: %s", uri, why)
        digests = digests.filter(pa.array(~bad))
    rows = np.flatnonzero(~bad)  # positions of the decodable files, in listing order
    order, starts = digest_groups(digests)
    labels = t["label"].to_numpy()[rows][order]
    if len(starts):
        conflicting = np.minimum.reduceat(labels, starts) != np.maximum.reduceat(labels, starts)
    else:
        conflicting = np.zeros(0, bool)
    keep = np.zeros(len(t), bool)
    keep[rows[order[starts[~conflicting]]]] = True
    # nothing to drop: the table itself, not a filtered copy of it
    kept = t if keep.all() else t.filter(pa.array(keep))
    dropped = {
        "duplicates_dropped": len(rows) - len(starts),
        "undecodable_dropped": n_bad,
        "conflicting_labels_dropped": int(conflicting.sum()),
    }
    return kept, dropped


def split(cfg: TrainConfig, t: pa.Table) -> pa.Table:
    """``t`` with ``group`` and ``split`` columns (whole groups per split, per class). Group keys
    are computed a batch at a time into arrow arrays: no list of every URI as Python strings."""
    groups = []
    sizes: dict[str, Counter] = {c: Counter() for c in cfg.class_names}
    for batch in t.select(["class", "uri"]).to_batches(ROW_BATCH):
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
    codes = pc.take(
        pa.array([SPLITS.index(v) for v in split_of.values()], pa.int8()), pc.index_in(group, value_set=names)
    )
    split_names = pa.array(SPLITS, pa.string())
    splits = pa.chunked_array([pa.DictionaryArray.from_arrays(c, split_names) for c in codes.chunks])
    return t.append_column("group", group).append_column("split", splits)


def sorted_codes(values: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """(the distinct strings sorted, each row's index into them), for plain or dictionary chunks."""
    names = sorted(
        {v for c in values.chunks for v in (c.dictionary if pa.types.is_dictionary(c.type) else c).to_pylist()}
    )
    parts = [np.empty(0, np.int32)]
    for c in values.chunks:
        if pa.types.is_dictionary(c.type):
            rank = np.array([names.index(v) for v in c.dictionary.to_pylist()], np.int32)
            parts.append(rank[c.indices.to_numpy(zero_copy_only=False)])
        else:
            parts.append(pc.index_in(c, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False))
    return names, np.concatenate(parts)


def manifest_hash(t: pa.Table) -> str:
    """``labelled.manifest_hash`` over a table: SHA-256 of (split, label, sha256) lines sorted by
    (split, sha256). The order is computed on the digests where they lie; the lines are made a
    batch at a time, never a sorted copy of the table."""
    order, _ = digest_groups(t["sha256"])
    names, code = sorted_codes(t["split"])
    order = order[np.argsort(code[order], kind="stable")]
    labels = t["label"].to_numpy()
    views = [digest_words(c) for c in t["sha256"].chunks]
    starts = np.cumsum([0] + [len(v) for v in views])
    h = hashlib.sha256()
    for i in range(0, len(order), ROW_BATCH):
        rows = order[i : i + ROW_BATCH]
        chunks = np.searchsorted(starts, rows, "right") - 1
        h.update(
            "".join(
                f"{names[code[r]]},{labels[r]},{views[c][r - starts[c]].tobytes().hex()}\n"
                for r, c in zip(rows.tolist(), chunks.tolist())
            ).encode()
        )
    return h.hexdigest()


def manifest_chunks(t: pa.Table, source: str) -> Iterator[bytes]:
    """``labelled.manifest_csv`` of the table (the same columns, the same ``csv`` quoting; every
    row a whole file of ``source``) as UTF-8 pieces of a few thousand rows, for
    :func:`storage.write_chunks`: a million-row manifest is never one string in the driver."""
    cols = t.select(list(MANIFEST_COLUMNS))
    sha = MANIFEST_COLUMNS.index("sha256")
    header = True
    for batch in cols.to_batches(ROW_BATCH):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if header:
            w.writerow(MANIFEST_COLUMNS + SOURCE_COLUMNS)
            header = False
        columns = [batch.column(i).to_pylist() for i in range(len(MANIFEST_COLUMNS))]
        columns[sha] = [d.hex() for d in columns[sha]]
        n = batch.num_rows
        columns += [[source] * n] + [[0] * n] * (len(SOURCE_COLUMNS) - 1)
        w.writerows(zip(*columns))
        yield buf.getvalue().encode()
    if header:
        yield (",".join(MANIFEST_COLUMNS + SOURCE_COLUMNS) + "\n").encode()


def manifest_csv(t: pa.Table, source: str) -> str:
    """The whole manifest as one string (small tables; tests compare it with ``labelled``'s)."""
    return b"".join(manifest_chunks(t, source)).decode()


@contextlib.contextmanager
def system_allocator() -> Iterator[None]:
    """Arrow buffers made inside come from the C allocator: it hands large freed blocks back to
    the OS, where arrow's default pool keeps them, and a scan makes several transient copies of
    columns as long as the listing."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def scan(cfg: TrainConfig, data_uri: str) -> Index:
    """List in the driver, hash and check in Ray Data, de-duplicate and split: the ``Index``."""
    with system_allocator():
        return _scan(cfg, data_uri)


def _scan(cfg: TrainConfig, data_uri: str) -> Index:
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
    # the commonest longer side; a tie goes to the side listed first, as labelled's Counter does
    sides, first_at, n_side = np.unique(
        np.maximum(t["width"].to_numpy(), t["height"].to_numpy()), return_index=True, return_counts=True
    )
    source = SourceConfig(uri=data_uri).label()
    stats = {
        "files": len(files),
        **dropped,
        "images": len(t),
        "per_split": counts,
        "groups": len(pc.unique(t["group"])),
        "source_size": int(sides[np.lexsort((first_at, -n_side))[0]]) if len(sides) else 0,
        # the same per-source record labelled.scan keeps, for its one source
        "sources": {
            source: {"uri": data_uri, "kind": "crops", "items": len(t), "per_split": counts, **dropped},
        },
    }
    log.info("data: %s", stats)
    return Index(table=t, manifest_hash=manifest_hash(t), stats=stats, source=source)
