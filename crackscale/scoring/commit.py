"""The commit protocol: a chunk's rows become ONE Parquet file, written atomically (local: staging
file + rename; S3: one PUT) and named by a hash of its keys; what is committed is read back from
the files themselves. A killed run leaves only whole files, and the re-run skips what they hold."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.errors import first_line
from crackscale.scoring.keys import KeySet, scored_key, version

PARTITIONING = pa.schema([("model_id", pa.string()), ("run_date", pa.string())])
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("mtime", pa.timestamp("us", tz="UTC")),
        ("crack_probability", pa.float32()),
        ("crack", pa.bool_()),
        ("threshold", pa.float32()),
        ("model_name", pa.string()),
        ("runtime", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
        ("tiles", pa.int32()),  # tiles scored: 1 for an image scored whole, null on error
        ("crack_tiles", pa.int32()),  # tiles at or above the threshold
    ]
)
QUARANTINE_DIR = "_quarantine"  # unreadable output files moved aside by `crackscale repair`
TILES_DIR = "_tiles"  # the tiles table, partitioned like the scores; '_': invisible to their readers


def committed(output: str, mid: str, cfg: StorageConfig) -> KeySet:
    """The hashes of every URI already committed under ``output`` for model ``mid``."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    fs, root = storage.resolve(storage.join(output, f"model_id={mid}"), cfg)
    try:
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return KeySet()  # nothing committed for this model yet
        data = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
        return KeySet.of_distinct(
            [scored_key(u, version(e, s, m)) for u, e, s, m in _versions(b)]
            for b in data.to_batches(columns=["uri", "etag", "size", "mtime"])
        )
    except pa.ArrowInvalid as e:  # a file that is not whole Parquet: never "nothing committed"
        raise damaged(output, fs, root, e) from None
    except OSError as e:
        raise storage.StorageError(f"cannot read committed scores under {output}: {e}") from None


def _versions(batch: pa.RecordBatch | pa.Table) -> Any:
    """(uri, etag, size, mtime in µs) of each committed row."""
    uri, etag, size = (batch.column(c).to_pylist() for c in ("uri", "etag", "size"))
    return zip(uri, etag, size, batch.column("mtime").cast(pa.int64()).to_pylist())


def unreadable(fs: Any, root: str) -> list[tuple[str, str]]:
    """(path, reason) of every Parquet file under ``root`` whose ``uri`` column cannot be read."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    bad = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        if {"_staging", QUARANTINE_DIR} & set(info.path.split("/")):
            continue
        try:
            with fs.open_input_file(info.path) as f:
                pq.read_table(f, columns=["uri"])
        except (pa.ArrowInvalid, OSError) as e:
            bad.append((info.path, first_line(e)))
    return bad


def damaged(output: str, fs: Any, root: str, e: Exception) -> storage.StorageError:
    """The error that stops a run over a damaged output: the file named, and what to do."""
    bad = unreadable(fs, root)
    what = f"{storage.uri_of(output, bad[0][0])} ({bad[0][1]})" if bad else f"a file under {output} ({e})"
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return storage.StorageError(
        f"damaged output file {what}{more}: move it aside with `crackscale repair --output {output}`, then run "
        "again (its images are scored again)"
    )


def part_name(table: pa.Table) -> str:
    """A chunk's file name: a hash of its keys (URI and version), the same whichever run commits them."""
    keys = sorted(f"{u}\n{version(e, s, m)}" for u, e, s, m in _versions(table))
    return "part-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24] + ".parquet"


def commit_chunk(
    table: pa.Table, output: str, mid: str, run_date: str, cfg: StorageConfig, tiles: pa.Table | None = None
) -> str:
    """Write one chunk's rows as one Parquet file, atomically; the name is a hash of its keys.

    ``tiles`` (the chunk's tiled photos' tiles) is written first, under ``_tiles/`` with the same
    partition and name: the scores file is the commit point, and readers of the tiles table take
    only files whose scores file exists (``committed_tiles``). A run killed between the two writes
    leaves a tiles file that is invisible, and overwritten when the chunk is committed again."""
    name = part_name(table)
    partition = (f"model_id={mid}", f"run_date={run_date}", name)
    if tiles is not None and tiles.num_rows:
        _write(tiles, storage.join(output, TILES_DIR, *partition), output, cfg)
    uri = storage.join(output, *partition)
    _write(table, uri, output, cfg)
    return uri


def _write(table: pa.Table, uri: str, output: str, cfg: StorageConfig) -> None:
    """One Parquet file that appears whole or not at all (S3: one PUT; local: staging + rename)."""
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    if storage.is_s3(output):
        storage.write_bytes(uri, data, cfg)
        return
    staging = storage.join(output, "_staging")  # '_' dirs are invisible to pyarrow/DuckDB readers
    os.makedirs(staging, exist_ok=True)
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    tmp = os.path.join(staging, f"{os.path.basename(uri)}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, uri)


def committed_tiles(output: str, cfg: StorageConfig | None = None) -> list[str]:
    """Paths (in ``output``'s filesystem) of the tiles files whose chunk is committed."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(output, cfg)
    root = root.rstrip("/")
    try:
        if fs.get_file_info(f"{root}/{TILES_DIR}").type == pafs.FileType.NotFound:
            return []  # no photo was scored as tiles here: no need to list the scores
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"cannot list {output}: {e}") from None
    parts = {i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")}
    prefix = TILES_DIR + "/"
    return [f"{root}/{p}" for p in sorted(parts) if p.startswith(prefix) and p[len(prefix) :] in parts]


def rows_table(t: pa.Table, meta: dict[str, Any], run_id: str) -> pa.Table:
    """Result rows from the actors → the output schema (decision at the threshold of the runtime
    that scored the row: the int8 model has its own, the others the artifact's)."""
    import pyarrow.compute as pc

    err = pc.if_else(pc.equal(t["error"], ""), pa.scalar(None, pa.string()), t["error"])
    ok = pc.is_null(err)
    p = pc.if_else(ok, t["crack_probability"].cast(pa.float32()), pa.scalar(None, pa.float32()))
    n = t.num_rows
    thr = t["threshold"].cast(pa.float32())  # each actor sends its runtime's

    def null_if(col: str, bad: Any, typ: pa.DataType) -> pa.Array:
        return pc.if_else(pc.equal(t[col], bad), pa.scalar(None, typ), t[col]).cast(typ)

    mtime = pc.if_else(pc.less(t["mtime_ns"], 0), pa.scalar(None, pa.int64()), pc.divide(t["mtime_ns"], 1000))
    return pa.table(
        {
            "uri": t["uri"].cast(pa.string()),
            "size": null_if("size", -1, pa.int64()),
            "etag": null_if("etag", "", pa.string()),
            "mtime": mtime.cast(pa.timestamp("us", tz="UTC")),
            "crack_probability": p,
            "crack": pc.greater_equal(p, thr),
            "threshold": thr,
            "model_name": pa.array([str(meta.get("name", ""))] * n, pa.string()),
            "runtime": t["runtime"].cast(pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "scored_at": t["scored_at_us"].cast(pa.timestamp("us", tz="UTC")),
            "error": err,
            **_tile_counts(t, ok, thr),
        },
        schema=SCHEMA,
    )


def _tile_counts(t: pa.Table, ok: pa.Array, thresholds: pa.Array) -> dict[str, pa.Array]:
    """``tiles`` and ``crack_tiles`` of each row (a photo scored whole counts as one tile)."""
    probs = t["tile_probs"].to_pylist() if "tile_probs" in t.column_names else [b""] * t.num_rows
    whole = t["crack_probability"].to_pylist()
    n, cracks = [], []
    for good, blob, p, thr in zip(ok.to_pylist(), probs, whole, thresholds.to_pylist()):
        if not good:
            n.append(None)
            cracks.append(None)
        elif blob:
            tiles = np.frombuffer(blob, np.float32)
            n.append(len(tiles))
            cracks.append(int((tiles >= np.float32(thr)).sum()))
        else:
            n.append(1)
            cracks.append(int(np.float32(p) >= np.float32(thr)))
    return {"tiles": pa.array(n, pa.int32()), "crack_tiles": pa.array(cracks, pa.int32())}
