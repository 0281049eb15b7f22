"""Nightly batch scoring with Ray Data: images in storage → exactly-once Parquet, one row per (image, model).

Driver: list the input page by page (or read a manifest), drop keys already committed for this
model (a sorted array of 128-bit key hashes read from the committed Parquet's ``uri`` column), cut
the rest into chunks and put them in the object store. The listing runs in a thread: scoring
starts when it ends, or after ``first_wave_s`` on the chunks listed so far, and each later "wave"
(one Ray Data pipeline) takes the chunks listed meanwhile. Ray Data: read + decode on
CPU tasks (an error row per bad file, never a failed block), predict in actors that load the model
once. Driver again: gather each chunk's result rows and commit the chunk as ONE Parquet file,
written atomically (local: staging file + rename; S3: one PUT), named by a hash of its keys.
A killed run leaves only whole files; the re-run skips what they hold. Within a run, a lost model
actor or node fails the attempt (actors are not restarted in place), and up to ``max_attempts``
attempts re-run the uncommitted chunks on what remains of the cluster. See README "Scoring".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from crackscale import artifact, storage
from crackscale.config import ConfigError, ScoreConfig, StorageConfig, dump, load, to_dict

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
PARTITIONING = pa.schema([("model_id", pa.string()), ("run_date", pa.string())])
SCHEMA = pa.schema([
    ("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string()),
    ("mtime", pa.timestamp("us", tz="UTC")), ("crack_probability", pa.float32()),
    ("crack", pa.bool_()), ("threshold", pa.float32()), ("model_name", pa.string()),
    ("runtime", pa.string()), ("run_id", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC")),
    ("error", pa.string()),
])


def model_id(meta: dict[str, Any]) -> str:
    """Identity of "scored by that model": the first 16 hex digits of the model file's SHA-256."""
    sha = str(meta.get("model_sha256") or "")
    if len(sha) < 16:
        raise artifact.ArtifactError("model.json has no model_sha256: cannot tell which images it scored")
    return sha[:16]


def key_hash(uri: str) -> bytes:
    """16-byte hash of a URI plus a 0x01 sentinel: numpy's fixed-width bytes dtype strips trailing
    NUL bytes, so a hash ending in 0x00 would never match itself in the sorted array."""
    return hashlib.blake2b(uri.encode(), digest_size=16).digest() + b"\x01"


# ---- listing --------------------------------------------------------------------------------------

def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def list_input(cfg: ScoreConfig) -> Iterator[dict[str, Any]]:
    """Input objects as {uri, size, etag, mtime_ns} (-1/"" when unknown), one page at a time."""
    if is_manifest(cfg.input):
        yield from _read_manifest(cfg)
        return
    exts = tuple(e.lower() for e in cfg.extensions)
    if storage.is_s3(cfg.input):
        yield from (o for o in _list_s3(cfg.input, cfg.storage, cfg.list_threads)
                    if o["uri"].lower().endswith(exts))
        return
    root = storage.resolve(cfg.input)[1]
    if not os.path.isdir(root):
        raise storage.StorageError(f"input not found: {cfg.input}")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(exts) and not name.startswith("."):
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                yield {"uri": path, "size": st.st_size, "etag": "", "mtime_ns": st.st_mtime_ns}


LIST_MAX_DEPTH = 3  # folder levels the S3 listing descends to find prefixes to list in parallel
LIST_PROBE_KEYS = 1000  # a prefix with at most this many keys is listed in one request, not walked


def _list_s3(uri: str, cfg: StorageConfig, threads: int = 1) -> Iterator[dict[str, Any]]:
    """Every object under the prefix, one ListObjectsV2 page at a time (no order across folders).

    With ``threads`` > 1 and more than ``LIST_PROBE_KEYS`` keys (one request tells), the prefix is
    walked folder by folder ("/"-delimited listings, a level's folders at once) down to the first
    level with at least ``threads`` folders (at most ``LIST_MAX_DEPTH`` levels), then each of those
    folders is listed flat, ``threads`` at a time. A listing is a chain of page requests, each
    waiting for the one before, so one chain per folder divides the time by up to ``threads``.
    Objects met on the way down are yielded as they come. Keys all in one folder are one chain
    either way. At most ``4 × threads`` pages wait for the caller.
    """
    import botocore.exceptions

    s = storage.S3Settings.resolve(cfg)
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client = storage.s3_client(cfg, pool=max(10, threads))

    def rows(page: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                yield {"uri": f"s3://{bucket}/{o['Key']}", "size": int(o["Size"]),
                       "etag": str(o.get("ETag", "")).strip('"'),
                       "mtime_ns": int(o["LastModified"].timestamp() * 1e9)}

    def pages(p: str, walk: bool = False) -> Iterator[dict[str, Any]]:
        kw = {"Delimiter": "/"} if walk else {}
        return client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=p, **kw)

    try:
        if threads <= 1:
            for page in pages(prefix):
                yield from rows(page)
            return
        probe = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=LIST_PROBE_KEYS)
        if not probe.get("IsTruncated"):  # a small prefix: walking its folders would cost more requests
            yield from rows(probe)
            return
        for page in _parallel_pages(pages, prefix, threads):
            yield from rows(page)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise storage.StorageError(f"cannot list {uri} (endpoint {s.describe()}): {e}") from None


def _parallel_pages(pages: Callable[..., Iterator[dict[str, Any]]], prefix: str,
                    threads: int) -> Iterator[dict[str, Any]]:
    """The pages of ``_list_s3``'s parallel walk, produced by a thread pool into a bounded queue. An
    error in any listing is raised here; closing the generator stops the threads."""
    import itertools
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    out: queue.Queue = queue.Queue(maxsize=4 * threads)
    closed = threading.Event()  # the caller stopped reading
    cancel = threading.Event()  # listings stop: the caller is gone, or one of them failed
    done = object()

    def put(item: Any, until: threading.Event) -> None:
        while not until.is_set():
            try:
                out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _ListingClosed

    def walk(p: str) -> list[str]:  # objects in this folder to the queue; returns its sub-folders
        subs: list[str] = []
        for page in pages(p, walk=True) if not cancel.is_set() else ():
            put(page, cancel)
            subs += [c["Prefix"] for c in page.get("CommonPrefixes", [])]
        return subs

    def flat(p: str) -> None:
        for page in pages(p) if not cancel.is_set() else ():
            put(page, cancel)

    def produce() -> None:
        result: Any = done
        with ThreadPoolExecutor(threads, thread_name_prefix="s3-list") as pool:
            try:
                level, depth = [prefix], 0
                while level and len(level) < threads and depth < LIST_MAX_DEPTH:
                    level, depth = sorted(itertools.chain.from_iterable(pool.map(walk, level))), depth + 1
                for _ in pool.map(flat, level):
                    pass
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                cancel.set()  # queued listings end without a request, running ones at their next page
                result = e
        if not isinstance(result, _ListingClosed):
            try:
                put(result, closed)
            except _ListingClosed:
                pass

    producer = threading.Thread(target=produce, name="s3-list", daemon=True)
    producer.start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()
        cancel.set()
        producer.join()


class _ListingClosed(Exception):
    """The caller stopped reading the listing."""


MANIFEST_BLOCK = 1 << 20  # bytes of a .txt manifest read at a time
MANIFEST_BATCH = 10_000  # rows of a .parquet manifest read at a time (.csv: pyarrow's 1 MB blocks)


def _read_manifest(cfg: ScoreConfig) -> Iterator[dict[str, Any]]:
    """A .txt (one URI per line; blank lines and ``#`` comments skipped), or .csv/.parquet with a
    ``uri`` column (+ optional ``size``, ``etag``). Streamed: the driver holds a block of the file and
    ≈ 16 B per distinct key (a manifest may repeat a key, listings never do; the first one is kept)."""
    fs, path = storage.resolve(cfg.input, cfg.storage)
    seen = KeySet()
    try:
        for rows in _manifest_rows(fs, path, cfg.input):
            rows = [r for r in rows if r.get("uri") and str(r["uri"]).strip()]
            uris = [str(r["uri"]).strip() for r in rows]
            for uri, r, new in zip(uris, rows, seen.add_many([key_hash(u) for u in uris])):
                if new:
                    yield {"uri": uri, "size": int(r.get("size") or -1), "etag": str(r.get("etag") or ""),
                           "mtime_ns": -1}
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


class KeySet:
    """A set of ``key_hash`` values in ≈ 16 B each: new ones in a Python set, merged every ``merge_at``
    keys into two sorted uint64 arrays (the digest's two halves; 10 M keys: ≈ 160 MB, where a set of
    bytes takes ≈ 1 GB). Used for the keys already committed and for a manifest's repeats."""

    def __init__(self, merge_at: int = 1_000_000) -> None:
        self._hi = np.zeros(0, dtype=np.uint64)  # sorted; _lo[i] is the other half of _hi[i]'s key
        self._lo = np.zeros(0, dtype=np.uint64)
        self._recent: set[bytes] = set()
        self._merge_at = merge_at

    @staticmethod
    def _halves(hashes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        b = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 17)  # 16 digest bytes + a sentinel
        return (b[:, :8].copy().view("<u8").ravel().astype(np.uint64),
                b[:, 8:16].copy().view("<u8").ravel().astype(np.uint64))

    @classmethod
    def of_distinct(cls, batches: Iterator[list[bytes]]) -> "KeySet":
        """All at once from batches of keys known to be distinct (committed keys are: each is in one
        file), merged in one sort."""
        halves = [cls._halves(hs) for hs in batches if hs]
        ks = cls()
        if halves:
            hi, lo = np.concatenate([h for h, _ in halves]), np.concatenate([x for _, x in halves])
            order = np.argsort(hi, kind="stable")
            ks._hi, ks._lo = hi[order], lo[order]
        return ks

    def _merged_has(self, at: int, hi: int, lo: int) -> bool:
        """Whether (hi, lo) is among the merged keys; ``at``: where ``hi`` sorts in ``_hi``."""
        while at < len(self._hi) and int(self._hi[at]) == hi:
            if int(self._lo[at]) == lo:
                return True
            at += 1
        return False

    def __contains__(self, h: bytes) -> bool:
        if h in self._recent:
            return True
        if not len(self._hi):
            return False
        hi, lo = int.from_bytes(h[:8], "little"), int.from_bytes(h[8:16], "little")
        return self._merged_has(int(self._hi.searchsorted(np.uint64(hi))), hi, lo)  # uint64: an int > 2**63 is not

    def add_many(self, hashes: list[bytes]) -> list[bool]:
        """Add each of ``hashes``; for each, True if it was new (a repeat within them counts too)."""
        found = np.zeros(len(hashes), dtype=bool)
        if len(self._hi) and hashes:  # one vectorised lookup among the merged keys
            hi, lo = self._halves(hashes)
            at = np.searchsorted(self._hi, hi)
            for k in np.flatnonzero(self._hi[np.minimum(at, len(self._hi) - 1)] == hi):  # rare
                found[k] = self._merged_has(int(at[k]), int(hi[k]), int(lo[k]))
        out = []
        for h, old in zip(hashes, found):
            new = not old and h not in self._recent
            if new:
                self._recent.add(h)
            out.append(new)
        if len(self._recent) >= self._merge_at:
            hi, lo = self._halves(list(self._recent))
            hi, lo = np.concatenate([self._hi, hi]), np.concatenate([self._lo, lo])
            order = np.argsort(hi, kind="stable")
            self._hi, self._lo, self._recent = hi[order], lo[order], set()
        return out

    def __len__(self) -> int:
        return len(self._hi) + len(self._recent)


# ---- commit protocol ---------------------------------------------------------------------------

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
    return KeySet.of_distinct([key_hash(u) for u in b.column(0).to_pylist()]
                              for b in data.to_batches(columns=["uri"]))


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


def _rows_table(t: pa.Table, meta: dict[str, Any], run_id: str) -> pa.Table:
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
    return pa.table({
        "uri": t["uri"].cast(pa.string()), "size": null_if("size", -1, pa.int64()),
        "etag": null_if("etag", "", pa.string()), "mtime": mtime.cast(pa.timestamp("us", tz="UTC")),
        "crack_probability": p, "crack": pc.greater_equal(p, pa.scalar(thr, pa.float32())),
        "threshold": pa.array([thr] * n, pa.float32()),
        "model_name": pa.array([str(meta.get("name", ""))] * n, pa.string()),
        "runtime": t["runtime"].cast(pa.string()), "run_id": pa.array([run_id] * n, pa.string()),
        "scored_at": t["scored_at_us"].cast(pa.timestamp("us", tz="UTC")), "error": err,
    }, schema=SCHEMA)


# ---- Ray Data stages -------------------------------------------------------------------------------

class _Listing:
    """The driver's listing in a thread of its own, so that scoring need not wait for its end.

    Pending keys (listed, not committed for this model) → chunks of ``chunk_size`` keys → blocks of
    ``block_size`` rows in the object store, tagged with the chunk id. A chunk's blocks appear
    together. The blocks are owned by the driver, so a later pipeline can re-run the chunks an
    earlier one did not commit without listing the input again. A listing error is kept in
    ``error`` (the chunks listed before it stay usable)."""

    def __init__(self, cfg: ScoreConfig, done: KeySet) -> None:
        import threading

        self.cfg, self._done = cfg, done
        self.chunks: list[tuple[str, Any, Any]] = []  # (chunk id, block ref, its metadata), a chunk's blocks together
        self.sizes: dict[str, int] = {}
        self.counts = {"listed": 0, "already_scored": 0}
        self.error: BaseException | None = None
        self.remote = False  # an object on S3 was listed (reads wait on a network: see actor_calls)
        self.ended = False
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listing", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._list()
        except BaseException as e:  # noqa: BLE001 - raised by run() in the main thread
            self.error = e
        finally:
            self._done = KeySet()
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def _list(self) -> None:
        import ray
        from tqdm import tqdm

        cfg, done, counts = self.cfg, self._done, self.counts
        pending: list[dict[str, Any]] = []

        def flush(rows: list[dict[str, Any]]) -> None:
            cid = hashlib.sha256("\n".join(r["uri"] for r in rows).encode()).hexdigest()[:16]
            self.remote = self.remote or any(storage.is_s3(r["uri"]) for r in rows)
            blocks = []
            for part in (rows[i: i + cfg.block_size] for i in range(0, len(rows), cfg.block_size)):
                t = pa.table({"uri": [r["uri"] for r in part], "chunk": [cid] * len(part),
                              "size": pa.array([r["size"] for r in part], pa.int64()),
                              "etag": [r["etag"] for r in part],
                              "mtime_ns": pa.array([r["mtime_ns"] for r in part], pa.int64())})
                blocks.append((cid, ray.put(t), _block_metadata(t)))
            with self.cond:
                self.sizes[cid] = len(rows)
                self.chunks.extend(blocks)
                self.cond.notify_all()

        # counts and rate while listing (no ETA: a prefix's size is unknown until listed)
        for obj in tqdm(list_input(cfg), desc="listing", unit=" obj", mininterval=5, disable=None):
            if self._stop.is_set():
                return
            counts["listed"] += 1
            if len(done) and key_hash(obj["uri"]) in done:
                counts["already_scored"] += 1
                continue
            pending.append(obj)
            if len(pending) == cfg.chunk_size:
                flush(pending)
                pending = []
            if counts["listed"] % 100_000 == 0:
                log.info("listed %d objects (%d already scored)", counts["listed"], counts["already_scored"])
        if pending:
            flush(pending)
        log.info("listing done: %d listed, %d already scored, %d to score in %d chunks", counts["listed"],
                 counts["already_scored"], sum(self.sizes.values()), len(self.sizes))

    def next_wave(self, finished: set[str], start_by: float) -> tuple[list[tuple[Any, Any]], dict[str, int]]:
        """((block ref, metadata) pairs, chunk sizes) of every listed chunk not in ``finished``, once
        the listing has ended, or once there is one and ``start_by`` (a time.time()) has passed;
        ([], {}) when the listing has ended and nothing is left."""
        with self.cond:
            while True:
                todo = [(cid, ref, meta) for cid, ref, meta in self.chunks if cid not in finished]
                if self.ended or (todo and time.time() >= start_by):
                    return [(ref, meta) for _, ref, meta in todo], {cid: self.sizes[cid] for cid, _, _ in todo}
                self.cond.wait(timeout=max(0.05, start_by - time.time()) if todo else None)

    def stop(self) -> None:
        """Stop listing (at the next object; a page request under way is finished first)."""
        self._stop.set()
        self._thread.join(timeout=60)


def _layout(cfg: ScoreConfig, nodes: set[str] | None = None) -> tuple[int, int]:
    """(model actors, inference threads per actor) for an attempt.

    Actors: ``num_actors``, else one per GPU (``use_gpu``); on CPU with ``decode: actor`` one per
    ``actor_cpus`` CPUs (each reads, decodes and predicts on its own core: measured faster than one
    multi-threaded actor per node, whose threads stall on each other while a decode takes a core),
    with ``decode: tasks`` one per CPU node. Threads: ``threads``, else the cluster's CPUs / actors
    with ``decode: actor`` on CPU, else 0 (all cores of the actor's node).

    ``nodes`` (an attempt after part of the cluster was lost): the IDs of the nodes that answered;
    at most as many actors as they hold (with ``decode: tasks``, with room for one decode task
    besides: more would take every CPU, and the pool would then wait forever for decoded images
    that no CPU is left to produce). A first attempt is not capped: asking for more actors than
    fit is how a user makes an autoscaling cluster grow.
    """
    import ray

    alive = [n["Resources"] for n in ray.nodes()
             if n.get("Alive") and (nodes is None or n["NodeID"] in nodes)]
    gpus = int(sum(r.get("GPU", 0) for r in alive))
    if cfg.use_gpu and gpus < 1 and not cfg.num_actors:
        raise ConfigError("config key 'use_gpu' is true but the Ray cluster has no GPUs")
    node_cpus = [r.get("CPU", 0) for r in alive if r.get("CPU", 0) > 0]
    per_core = decode_in_actor(cfg) and not cfg.use_gpu
    if cfg.num_actors or cfg.use_gpu:
        want = cfg.num_actors or gpus
    elif per_core and cfg.actor_cpus > 0:
        want = sum(max(1, int(c // cfg.actor_cpus)) for c in node_cpus) or 1
    else:
        want = max(1, len(node_cpus))
    n = want
    if nodes is not None:
        cpus = sum(node_cpus) - (0 if decode_in_actor(cfg) else cfg.decode_cpus)
        fit = int(cpus // cfg.actor_cpus) if cfg.actor_cpus > 0 else want
        fit = min(fit, gpus) if cfg.use_gpu else fit
        if fit < want:
            log.warning("the remaining cluster (%d nodes, %g CPUs free for actors, %d GPUs) holds %d model actors, "
                        "not %d: using %d", len(alive), cpus, gpus, max(fit, 1), want, max(fit, 1))
        n = max(1, min(want, fit))
    threads = cfg.threads or (max(1, int(sum(node_cpus) // n)) if per_core else 0)
    return n, threads


class IncompleteChunks(RuntimeError):
    """Rows of some chunks never came back (nothing of those chunks was committed)."""


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and everything in its cause chain (Ray wraps task errors in RayTaskError.cause)."""
    out: list[BaseException] = []
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    return out


def _system_failure(e: BaseException) -> bool:
    """A lost actor, worker, node or object (not a bug in our code, not bad input)."""
    from ray import exceptions as rx

    lost = (rx.RayActorError, rx.ActorUnavailableError, rx.ObjectLostError, rx.WorkerCrashedError,
            rx.NodeDiedError, rx.RaySystemError, IncompleteChunks)
    return any(isinstance(x, lost) for x in _causes(e))


def _failed_actors(e: BaseException) -> set[str]:
    """IDs of the actors whose loss ``e`` reports."""
    from ray import exceptions as rx

    return {x.actor_id for x in _causes(e) if isinstance(x, rx.RayActorError) and x.actor_id}


def _answering_nodes(timeout_s: float) -> tuple[set[str], set[str]]:
    """(nodes that run a zero-CPU task within ``timeout_s``, nodes the cluster lists alive but do not).

    A node that was just lost stays "alive" in ``ray.nodes()`` until the cluster has missed
    enough of its health checks; only asking it tells the difference.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def node_id() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    probe = ray.remote(num_cpus=0, max_retries=0)(node_id)
    listed = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote(): i
            for i in listed}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for r in late:
        ray.cancel(r, force=True)
    answered = set()
    for r in ready:
        try:
            answered.add(ray.get(r))
        except Exception:  # noqa: BLE001 (a node that fails the probe is not one to size a pool on)
            pass
    return answered, set(listed) - answered


def _end_attempt(failed: set[str], timeout_s: float = 120.0) -> set[str]:
    """After a failed attempt: stop its model actors, find the nodes that remain; returns their IDs.

    The survivors are killed (the failed attempt's executor does not reliably do it, and one left
    alive keeps the CPU a decode task of the next attempt needs). The lost ones (``failed``) are
    not: the cluster declares them dead with their node. Then every node listed alive is asked to
    answer; one that does not is waited for (up to ``timeout_s`` in all) until the cluster declares
    it dead, so the next attempt neither sizes its pool on it nor sends tasks to it.
    """
    import gc

    import ray
    from ray._private import state  # the GCS actor table (works without a dashboard)

    gc.collect()  # drops the failed attempt's executor where only reference cycles held it
    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    core = ray._private.worker.global_worker.core_worker
    deadline = time.monotonic() + timeout_s
    killed: set[str] = set()
    while True:
        alive = {i for i, a in state.actors(job_id=job).items()
                 if "Predictor" in a.get("ActorClassName", "") and a.get("State") != "DEAD"}
        for i in alive - failed - killed:
            ray.kill(core.get_actor_handle(ray.ActorID.from_hex(i)), no_restart=True)
            killed.add(i)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(1)
    if alive:
        log.warning("%d model actors of the failed attempt still alive after %.0f s", len(alive), timeout_s)
    answered, silent = _answering_nodes(min(30.0, max(5.0, deadline - time.monotonic())))
    while silent and time.monotonic() < deadline:
        log.info("waiting for the cluster to declare %d unanswering node(s) dead", len(silent))
        time.sleep(2)
        silent &= {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    if silent:
        log.warning("%d node(s) listed alive did not answer; the next attempt does not count them",
                    len(silent))
    return answered


def _block_metadata(table: pa.Table) -> Any:
    """Ray Data's metadata of a block of keys, computed here, where the table is (None if this Ray
    has no such function: ``_dataset`` then asks Ray to compute it)."""
    try:
        from ray.data._internal.util import get_table_block_metadata_schema
    except ImportError:  # pragma: no cover - another Ray version
        return None
    return get_table_block_metadata_schema(table)


def _dataset(blocks: list[tuple[Any, Any]]) -> Any:
    """The Dataset of listed blocks: ``ray.data.from_arrow_refs`` without the remote task per block
    that it runs to learn each block's metadata, which the listing computed already. Those tasks
    were ≈ 1.3 s of a run's start-up on a 2-core node (each worker running one first imports
    ``ray.data``). The plan is the one ``from_arrow_refs`` builds, from Ray 2.60's internals; with
    another Ray, where they differ, it is ``from_arrow_refs`` itself."""
    import ray

    refs, metas = [r for r, _ in blocks], [m for _, m in blocks]
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.from_operators import FromArrow
        from ray.data._internal.stats import DatasetStats
        from ray.data.context import DataContext
        from ray.data.dataset import MaterializedDataset
    except ImportError:  # pragma: no cover - another Ray version
        return ray.data.from_arrow_refs(refs)
    if any(m is None for m in metas):  # pragma: no cover - another Ray version
        return ray.data.from_arrow_refs(refs)
    stats = DatasetStats(metadata={"FromArrow": metas}, parent=None)
    context = DataContext.get_current().copy()
    return MaterializedDataset(LogicalPlan(FromArrow(refs, metas), context), context, stats)


def _pipeline(blocks: list[tuple[Any, Any]], cfg: ScoreConfig, meta: dict[str, Any], nodes: set[str] | None,
              remote: bool = False) -> Any:
    """Blocks of keys → model actors that read, decode and predict (``decode: actor``), or read +
    decode tasks → model actors (``decode: tasks``); actors sized to the cluster as it is now."""
    from ray.data import ActorPoolStrategy

    from crackscale.runtime import Predictor, decode_batch, resize_antialias

    n_actors, threads = _layout(cfg, nodes)
    n_actors = min(n_actors, len(blocks))  # an actor per block at most (a small wave, a tiny input)
    cfg = dataclasses.replace(cfg, threads=threads)
    log.info("%d model actors, %s inference threads each", n_actors, threads or "all the node's cores as")
    decode = {"image_size": int(meta["image_size"]), "cfg": cfg, "antialias": resize_antialias(meta)}
    ds = _dataset(blocks)
    if in_actor := decode_in_actor(cfg):  # no decoded image crosses the object store
        compute = ActorPoolStrategy(size=n_actors, max_concurrent_calls_per_actor=actor_calls(cfg, remote),
                                    enable_true_multi_threading=True)
    else:
        ds = ds.map_batches(decode_batch, batch_size=cfg.block_size, num_cpus=cfg.decode_cpus, fn_kwargs=decode)
        compute = ActorPoolStrategy(size=n_actors)
    # max_restarts=0: a model actor lost with its node is not restarted in place. Restarted on a
    # surviving node it can take the CPUs that re-running the lost decode outputs needs, and the
    # pipeline then waits forever; instead the attempt fails and run() starts a new one.
    with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray 2.60)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        return ds.map_batches(Predictor, batch_size=cfg.block_size,
                              fn_constructor_kwargs={"cfg": cfg, "decode": decode if in_actor else None},
                              compute=compute, num_cpus=cfg.actor_cpus,
                              num_gpus=1 if cfg.use_gpu else 0, max_restarts=0)


def actor_calls(cfg: ScoreConfig, remote: bool) -> int:
    """Calls at once per model actor with ``decode: actor``: ``actor_calls``, else 2 when objects are
    read from S3 (one call's reads wait on the network while the other's batch is in the model; the
    model itself runs one batch at a time), else 1. Local files are read in ≈ 0.02 ms each, and a
    second call only makes its decode contend with the model for the actor's core: on the 2-core
    host one call at a time scored 20,000 local images in 45.6 and 47.1 s, two in 47.8 and 49.3 s
    (alternating runs)."""
    return cfg.actor_calls or (2 if remote else 1)


def decode_in_actor(cfg: ScoreConfig) -> bool:
    """``decode`` resolved: ``auto`` decodes in the model actors on CPU, in tasks with GPUs."""
    return cfg.decode == "actor" or (cfg.decode == "auto" and not cfg.use_gpu)


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every not-yet-scored image of ``cfg.input`` with ``cfg.model``; returns the summary."""
    for key in ("model", "input", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"config key '{key}' is required (--set {key}=URI)")
    t0 = time.time()
    meta = artifact.read_meta(cfg.model, cfg.storage)
    mid = model_id(meta)
    storage.check_bucket(cfg.output, cfg.storage)
    now = dt.datetime.now(dt.timezone.utc)
    run_id = now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    run_date = cfg.run_date or now.strftime("%Y-%m-%d")
    listing = _Listing(cfg, committed(cfg.output, mid, cfg.storage))
    log.info("run %s: model %s (%s), listing %s", run_id, mid, meta.get("name"), cfg.input)
    summary: dict[str, Any] = {
        "run_id": run_id, "model_id": mid, "model_name": meta.get("name"), "model": cfg.model,
        "input": cfg.input, "output": cfg.output, "run_date": run_date, "listed": 0, "already_scored": 0,
        "scored": 0, "failed": 0, "chunks": 0, "runtime": None, "attempts": 0, "waves": 0,
    }
    finished: set[str] = set()  # chunks committed by this run
    nodes: set[str] | None = None  # after a failed attempt: the nodes that answered
    failures = 0
    start_by = time.time() + cfg.first_wave_s  # the first pipeline waits this long for the listing's end
    try:
        while True:
            todo, sizes = listing.next_wave(finished, start_by)
            if not todo:
                break
            if listing.error is not None:  # the chunks listed before the error are scored first
                log.error("listing failed (%s); scoring the %d chunks listed before it", listing.error, len(sizes))
            summary["attempts"] += 1
            if not failures:
                summary["waves"] += 1
                log.info("wave %d: %d chunks (%d images)%s", summary["waves"], len(sizes), sum(sizes.values()),
                         "" if listing.ended else ", listing goes on")
            failure, lost = "", set()
            try:
                _gather_and_commit(_pipeline(todo, cfg, meta, nodes, listing.remote), sizes, finished,
                                   cfg, meta, mid, run_id, run_date, summary, t0)
                failures = 0
            except Exception as e:
                failures += 1
                if failures >= cfg.max_attempts or not _system_failure(e):
                    raise
                failure = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                lost = _failed_actors(e)
            if failure:  # outside the except block: the traceback (and the attempt's actors) can be freed
                log.warning("attempt %d lost part of the cluster (%s); re-running the %d uncommitted chunks "
                            "on the nodes that remain", summary["attempts"], failure, len(set(sizes) - finished))
                nodes = _end_attempt(lost) or None  # none answered (probe failed): size from ray.nodes()
    finally:
        listing.stop()
    if listing.error is not None:
        raise listing.error
    summary.update(listing.counts)
    elapsed = time.time() - t0
    n = summary["scored"] + summary["failed"]
    summary.update(duration_s=round(elapsed, 2), throughput_img_s=round(n / elapsed, 1))
    if "first_result_s" in summary:  # Ray start-up, listing, model load and parity check
        summary["startup_s"] = round(summary.pop("first_result_s"), 2)
    base = storage.join(cfg.output, "_runs", run_id)
    summary["summary_uri"] = base + ".json"
    storage.write_text(base + ".yaml", dump(cfg), cfg.storage)
    storage.write_text(base + ".json", json.dumps(summary, indent=2), cfg.storage)
    log.info("run %s done: %s", run_id, json.dumps(summary))
    return summary


def _gather_and_commit(ds: Any, sizes: dict[str, int], finished: set[str], cfg: ScoreConfig,
                       meta: dict[str, Any], mid: str, run_id: str, run_date: str, summary: dict[str, Any],
                       t0: float) -> None:
    """Buffer result rows per chunk (de-duplicated by URI: retried tasks may repeat rows) and
    commit each chunk as soon as all its keys are in; committed chunks are added to ``finished``."""
    import pyarrow.compute as pc

    parts: dict[str, list[pa.Table]] = {}
    seen: dict[str, set[str]] = {}
    total = summary["scored"] + summary["failed"] + sum(sizes.values())  # earlier waves' images too
    from tqdm import tqdm

    bar = tqdm(total=total, initial=summary["scored"] + summary["failed"], desc="scoring", unit=" img",
               mininterval=5, disable=None)
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        for batch in batches:
            if "first_result_s" not in summary:  # model load, Ray start-up and listing are behind us
                summary["first_result_s"] = time.time() - t0
                summary["startup_images"] = batch.num_rows  # counted in the start-up period
            for cid in pc.unique(batch["chunk"]).to_pylist():
                if cid in finished:  # a late duplicate from a retried task
                    continue
                sub = batch.filter(pc.equal(batch["chunk"], cid))
                keys = seen.setdefault(cid, set())
                mask = [u not in keys for u in sub["uri"].to_pylist()]
                sub = sub.filter(pa.array(mask, pa.bool_()))
                if not sub.num_rows:
                    continue
                keys.update(sub["uri"].to_pylist())
                parts.setdefault(cid, []).append(sub)
                if len(keys) < sizes[cid]:
                    continue
                rows = _rows_table(pa.concat_tables(parts.pop(cid)), meta, run_id)
                uri = commit_chunk(rows, cfg.output, mid, run_date, cfg.storage)
                del seen[cid]
                finished.add(cid)
                ok = rows["error"].null_count
                summary["scored"] += ok
                summary["failed"] += rows.num_rows - ok
                summary["chunks"] += 1
                summary["runtime"] = rows["runtime"][0].as_py()
                done = summary["scored"] + summary["failed"]
                bar.update(rows.num_rows)
                log.info("committed %s (%d rows): %d/%d images, %.1f img/s", uri, rows.num_rows,
                         done, total, done / max(time.time() - t0, 1e-9))
    finally:  # stops this attempt's executor and actors now, not when the traceback is freed
        batches.close()
        bar.close()
    if parts:
        raise IncompleteChunks(f"{len(parts)} chunks came back incomplete; nothing of them was committed")


# ---- command line ---------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="YAML config file (keys of ScoreConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set batch_size=128")
    p.add_argument("--model", help="model artifact URI (= --set model=…)")
    p.add_argument("--input", help="image prefix or manifest URI (= --set input=…)")
    p.add_argument("--output", help="Parquet output root (= --set output=…)")
    return p


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    overrides = list(args.set)
    for key in ("model", "input", "output"):
        if getattr(args, key, None):
            overrides.append(f"{key}={getattr(args, key)}")
    return load(ScoreConfig, args.config, overrides)


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    """Load the config, attach to (or start) Ray, score; returns the JSON summary."""
    import ray

    cfg = config_from_args(args)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS", "").strip() == "local":  # a Ray of its own, for this job only
            ray.init(include_dashboard=cfg.dashboard)  # no dashboard: ≈ 2 s and a daemon's CPU saved
        else:
            ray.init()  # under `ray job submit` this attaches to the cluster
    return run(cfg)


def add_cli(subparsers: Any, func: Callable[[argparse.Namespace], Any] | None = None) -> None:
    """Register ``crackscale score``."""
    p = subparsers.add_parser(
        "score", help="score images with a model artifact into Parquet (same as jobs/score.py)",
        epilog="example: crackscale score --model runs/demo/model --input s3://bucket/images/ "
               "--output s3://bucket/scores/")
    add_arguments(p)
    p.set_defaults(func=func or cmd_score)


__all__ = ["run", "add_cli", "committed", "commit_chunk", "list_input", "model_id", "SCHEMA",
           "PARTITIONING", "to_dict"]
