"""Manifests as scoring input: a .txt (one URI per line), or a .csv/.parquet with a ``uri`` column
(+ optional ``size``, ``etag``), streamed a block at a time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from crackscale import storage
from crackscale.config.loader import ConfigError
from crackscale.config.score import ScoreConfig
from crackscale.scoring.keys import KeySet, key_hash

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
MANIFEST_BLOCK = 1 << 20  # bytes of a .txt manifest read at a time
MANIFEST_BATCH = 10_000  # rows of a .parquet manifest read at a time (.csv: pyarrow's 1 MB blocks)


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def read_manifest(cfg: ScoreConfig) -> Iterator[dict[str, Any]]:
    """A .txt (one URI per line; blank lines and ``#`` comments skipped), or .csv/.parquet with a
    ``uri`` column (+ optional ``size``, ``etag``). Streamed: the driver holds a block of the file and
    16 B per distinct key (a manifest may repeat a key, listings never do; the first one is kept)."""
    fs, path = storage.resolve(cfg.input, cfg.storage)
    seen = KeySet()
    try:
        for rows in _manifest_rows(fs, path, cfg.input):
            rows = [r for r in rows if r.get("uri") and str(r["uri"]).strip()]
            uris = [str(r["uri"]).strip() for r in rows]
            for uri, r, new in zip(uris, rows, seen.add_many([key_hash(u) for u in uris])):
                if new:
                    yield {
                        "uri": uri,
                        "size": int(r.get("size") or -1),
                        "etag": str(r.get("etag") or ""),
                        "mtime_ns": -1,
                    }
    except FileNotFoundError:
        raise storage.StorageError(f"not found: {cfg.input}") from None
    except (OSError, pa.ArrowInvalid) as e:
        raise storage.wrap_error(cfg.input, cfg.storage, e) from None


def _manifest_rows(fs: Any, path: str, uri: str) -> Iterator[list[dict[str, Any]]]:
    """The manifest's rows, a block at a time."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    low = uri.lower()
    if low.endswith(".txt"):
        with fs.open_input_stream(path) as f:
            rest = b""
            while block := f.read(MANIFEST_BLOCK):
                buf = rest + block
                cut = buf.rfind(b"\n") + 1  # whole lines only (a UTF-8 character is never cut)
                rest = buf[cut:]
                yield _txt_rows(buf[:cut])
            yield _txt_rows(rest)
        return
    if low.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if "uri" not in pf.schema_arrow.names:
                raise ConfigError(f"manifest {uri} has no 'uri' column (columns: {pf.schema_arrow.names})")
            cols = [c for c in ("uri", "size", "etag") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=MANIFEST_BATCH, columns=cols):
                yield batch.to_pylist()
        return
    with fs.open_input_stream(path) as f:
        reader = pcsv.open_csv(f)  # 1 MB blocks
        if "uri" not in reader.schema.names:
            raise ConfigError(f"manifest {uri} has no 'uri' column (columns: {reader.schema.names})")
        for batch in reader:
            yield batch.to_pylist()


def _txt_rows(data: bytes) -> list[dict[str, Any]]:
    lines = (ln.strip() for ln in data.decode().split("\n"))
    return [{"uri": ln} for ln in lines if ln and not ln.startswith("#")]
