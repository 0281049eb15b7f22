"""The commit protocol: a chunk's rows become ONE Parquet file, written atomically (local: staging
file + rename; S3: one PUT) and named by a hash of its keys; what is committed is read back from
the files themselves. A killed run leaves only whole files, and the re-run skips what they hold."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import pyarrow as pa

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.scoring.keys import KeySet, key_hash

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
    ]
)


def committed(output: str, mid: str, cfg: StorageConfig) -> KeySet:
    """The hashes of every URI already committed under ``output`` for model ``mid``."""
    import pyarrow.dataset as ds

    fs, root = storage.resolve(storage.join(output, f"model_id={mid}"), cfg)
    try:
        data = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
    except (FileNotFoundError, pa.ArrowInvalid):
        return KeySet()
    except OSError as e:
        raise storage.StorageError(f"cannot read committed scores under {output}: {e}") from None
    return KeySet.of_distinct([key_hash(u) for u in b.column(0).to_pylist()] for b in data.to_batches(columns=["uri"]))


def commit_chunk(table: pa.Table, output: str, mid: str, run_date: str, cfg: StorageConfig) -> str:
    """Write one chunk's rows as one Parquet file, atomically; the name is a hash of its keys."""
    import pyarrow.parquet as pq

    keys = sorted(table.column("uri").to_pylist())
    name = "part-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24] + ".parquet"
    uri = storage.join(output, f"model_id={mid}", f"run_date={run_date}", name)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    if storage.is_s3(output):
        storage.write_bytes(uri, data, cfg)  # a single PUT: the object appears whole or not at all
        return uri
    staging = storage.join(output, "_staging")  # '_' dirs are invisible to pyarrow/DuckDB readers
    os.makedirs(staging, exist_ok=True)
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    tmp = os.path.join(staging, f"{name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, uri)
    return uri


def rows_table(t: pa.Table, meta: dict[str, Any], run_id: str) -> pa.Table:
    """Result rows from the actors → the output schema (decision at the artifact's threshold)."""
    import pyarrow.compute as pc

    err = pc.if_else(pc.equal(t["error"], ""), pa.scalar(None, pa.string()), t["error"])
    ok = pc.is_null(err)
    p = pc.if_else(ok, t["crack_probability"].cast(pa.float32()), pa.scalar(None, pa.float32()))
    thr = float(meta.get("threshold", 0.5))
    n = t.num_rows

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
            "crack": pc.greater_equal(p, pa.scalar(thr, pa.float32())),
            "threshold": pa.array([thr] * n, pa.float32()),
            "model_name": pa.array([str(meta.get("name", ""))] * n, pa.string()),
            "runtime": t["runtime"].cast(pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "scored_at": t["scored_at_us"].cast(pa.timestamp("us", tz="UTC")),
            "error": err,
        },
        schema=SCHEMA,
    )
