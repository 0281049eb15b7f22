"""The input, listed: a local folder, an S3 prefix (folders walked in parallel), or a manifest; and
the driver thread that lists while scoring runs, turning pending keys into chunks of blocks."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from crackscale import storage
from crackscale.config.score import ScoreConfig
from crackscale.config.storage import StorageConfig
from crackscale.scoring.blocks import block_metadata
from crackscale.scoring.keys import KeySet, scored_key, version
from crackscale.scoring.manifests import is_manifest, read_manifest

log = logging.getLogger(__name__)

LIST_MAX_DEPTH = 3  # folder levels the S3 listing descends to find prefixes to list in parallel
LIST_PROBE_KEYS = 1000  # a prefix with at most this many keys is listed in one request, not walked


def list_input(cfg: ScoreConfig) -> Iterator[dict[str, Any]]:
    """Input objects as {uri, size, etag, mtime_ns} (-1/"" when unknown), one page at a time."""
    if is_manifest(cfg.input):
        yield from read_manifest(cfg)
        return
    exts = tuple(e.lower() for e in cfg.extensions)
    if storage.is_s3(cfg.input):
        yield from (o for o in _list_s3(cfg.input, cfg.storage, cfg.list_threads) if o["uri"].lower().endswith(exts))
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
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    client = storage.s3_client(cfg, pool=max(10, threads))

    def rows(page: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                yield {
                    "uri": f"s3://{bucket}/{o['Key']}",
                    "size": int(o["Size"]),
                    "etag": str(o.get("ETag", "")).strip('"'),
                    "mtime_ns": int(o["LastModified"].timestamp() * 1e9),
                }

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


def _parallel_pages(
    pages: Callable[..., Iterator[dict[str, Any]]], prefix: str, threads: int
) -> Iterator[dict[str, Any]]:
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


def blocks_of(rows: list[dict[str, Any]], size: int, max_bytes: int) -> Iterator[list[dict[str, Any]]]:
    """``rows`` cut into blocks of at most ``size`` rows and, where sizes are known, at most
    ``max_bytes`` (0: no limit) of listed objects; a block holds at least one row."""
    block: list[dict[str, Any]] = []
    total = 0
    for r in rows:
        n = max(int(r["size"]), 0)
        if block and (len(block) == size or (max_bytes and total + n > max_bytes)):
            yield block
            block, total = [], 0
        block.append(r)
        total += n
    if block:
        yield block


def _version(obj: dict[str, Any]) -> str:
    """A listed object's version, as its committed row will record it (mtime in µs)."""
    mtime = obj["mtime_ns"] // 1000 if obj["mtime_ns"] >= 0 else None
    return version(obj["etag"] or None, obj["size"], mtime)


class Listing:
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
            for part in blocks_of(rows, cfg.block_size, cfg.block_bytes):
                t = pa.table(
                    {
                        "uri": [r["uri"] for r in part],
                        "chunk": [cid] * len(part),
                        "size": pa.array([r["size"] for r in part], pa.int64()),
                        "etag": [r["etag"] for r in part],
                        "mtime_ns": pa.array([r["mtime_ns"] for r in part], pa.int64()),
                    }
                )
                blocks.append((cid, ray.put(t), block_metadata(t)))
            with self.cond:
                self.sizes[cid] = len(rows)
                self.chunks.extend(blocks)
                self.cond.notify_all()

        # counts and rate while listing (no ETA: a prefix's size is unknown until listed)
        for obj in tqdm(list_input(cfg), desc="listing", unit=" obj", mininterval=5, disable=None):
            if self._stop.is_set():
                return
            counts["listed"] += 1
            if len(done) and scored_key(obj["uri"], _version(obj)) in done:
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
        log.info(
            "listing done: %d listed, %d already scored, %d to score in %d chunks",
            counts["listed"],
            counts["already_scored"],
            sum(self.sizes.values()),
            len(self.sizes),
        )

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
