"""One run per (output, model) at a time: a lease object the run creates atomically before it
lists, renews from a driver thread, and deletes when it ends.

``<output>/_leases/model_id=<id>.json`` holds the run id, host, process, start and last heartbeat.
It is created only if absent: on S3 by a conditional PUT (``If-None-Match: *``; a store that
ignores the condition is caught by reading the lease back), locally by an exclusive create. A
second run finds it and stops with one line naming the holder, or waits for it (``wait_for_lease``).
A lease whose heartbeat is older than ``lease_ttl_s`` belongs to a run that died: it is taken over
by replacing exactly that version (S3: ``If-Match`` its ETag; locally: renaming it away, which only
one taker can do). A run that finds its lease taken over stops before its next commit.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from crackscale import storage
from crackscale.config.score import ScoreConfig

log = logging.getLogger(__name__)

LEASES_DIR = "_leases"


class LeaseHeld(storage.StorageError):
    """Another live run holds the lease of this output and model."""


@dataclass
class _Version:
    body: dict[str, Any]
    tag: str  # S3: the ETag; local: "" (replacement goes through a rename)


class Lease:
    """The lease of ``(output, model_id)`` for ``run_id``; ``acquire`` first, ``release`` at the end."""

    def __init__(self, cfg: ScoreConfig, model_id: str, run_id: str) -> None:
        self.cfg, self.run_id = cfg, run_id
        self.uri = storage.join(cfg.output, LEASES_DIR, f"model_id={model_id}.json")
        self.lost: str = ""  # why the lease is no longer ours ("" while it is)
        self._tag = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the lease object ----------------------------------------------------------------------

    def _body(self, started: float | None = None) -> dict[str, Any]:
        now = time.time()
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": started or now,
            "heartbeat_at": now,
            "ttl_s": self.cfg.lease_ttl_s,
        }

    def _read(self) -> _Version | None:
        if storage.is_s3(self.uri):
            bucket, _, key = self.uri[len("s3://") :].partition("/")
            try:
                r = storage.s3_client(self.cfg.storage).get_object(Bucket=bucket, Key=key)
            except Exception as e:  # noqa: BLE001 - botocore's ClientError, by code
                if _code(e) in ("NoSuchKey", "404"):
                    return None
                raise storage.wrap_error(self.uri, self.cfg.storage, e) from None
            return _Version(json.loads(r["Body"].read()), str(r.get("ETag", "")))
        try:
            with open(self.uri) as f:
                return _Version(json.load(f), "")
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # being written (locally written whole, but be safe): empty
            return _Version({}, "")

    def _create(self, body: dict[str, Any], replace_tag: str | None = None) -> bool:
        """Write ``body`` if the lease is absent (or, with ``replace_tag``, still that version)."""
        data = json.dumps(body).encode()
        if storage.is_s3(self.uri):
            bucket, _, key = self.uri[len("s3://") :].partition("/")
            cond = {"IfMatch": replace_tag} if replace_tag else {"IfNoneMatch": "*"}
            try:
                r = storage.s3_client(self.cfg.storage).put_object(Bucket=bucket, Key=key, Body=data, **cond)
            except Exception as e:  # noqa: BLE001
                if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise storage.wrap_error(self.uri, self.cfg.storage, e) from None
            self._tag = str(r.get("ETag", ""))
            mine = self._read()  # a store that ignores the condition would let two runs both "win"
            if mine is None or mine.body.get("run_id") != self.run_id:
                return False
            self._tag = mine.tag
            return True
        os.makedirs(os.path.dirname(self.uri), exist_ok=True)
        try:
            fd = os.open(self.uri, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _delete(self) -> None:
        if storage.is_s3(self.uri):  # boto3: pyarrow's delete would leave a folder marker behind
            bucket, _, key = self.uri[len("s3://") :].partition("/")
            storage.s3_client(self.cfg.storage).delete_object(Bucket=bucket, Key=key)
        else:
            os.remove(self.uri)

    def _take_over(self, old: _Version) -> bool:
        """Replace a dead run's lease, if no one else did first."""
        if storage.is_s3(self.uri):
            return self._create(self._body(), replace_tag=old.tag)
        try:
            os.rename(self.uri, f"{self.uri}.expired-{uuid.uuid4().hex}")  # one taker wins the rename
        except FileNotFoundError:
            return False
        return self._create(self._body())

    # ---- the run's side ------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, waiting for it with ``wait_for_lease``; else raise LeaseHeld."""
        while True:
            if self._create(self._body()):
                break
            old = self._read()
            if old is None:
                continue  # released meanwhile
            age = time.time() - float(old.body.get("heartbeat_at") or 0)
            if age > float(old.body.get("ttl_s") or self.cfg.lease_ttl_s):
                log.warning("taking over the lease of run %s (no heartbeat for %.0f s)", old.body.get("run_id"), age)
                if self._take_over(old):
                    break
                continue
            if not self.cfg.wait_for_lease:
                b = old.body
                raise LeaseHeld(
                    f"{self.cfg.output} is being scored by run {b.get('run_id')} on {b.get('host')} (pid "
                    f"{b.get('pid')}, heartbeat {age:.0f} s ago): wait for it with --wait, or let its lease "
                    f"expire ({self.cfg.lease_ttl_s:g} s without heartbeat) if that run is gone"
                )
            log.info("waiting for run %s to finish (%s)", old.body.get("run_id"), self.uri)
            time.sleep(min(5.0, self.cfg.lease_ttl_s / 4))
        self._thread = threading.Thread(target=self._heartbeat, name="lease", daemon=True)
        self._thread.start()
        log.info("lease %s taken by run %s", self.uri, self.run_id)

    def _heartbeat(self) -> None:
        started = time.time()
        while not self._stop.wait(self.cfg.lease_ttl_s / 4):
            try:
                cur = self._read()
                if cur is None or cur.body.get("run_id") != self.run_id:
                    self.lost = f"its lease {self.uri} was taken over by run {cur.body.get('run_id') if cur else '?'}"
                    return
                body = dict(self._body(float(cur.body.get("started_at") or started)))
                if storage.is_s3(self.uri):
                    if not self._create(body, replace_tag=cur.tag):
                        self.lost = f"its lease {self.uri} changed under it"
                        return
                else:
                    storage.write_text(self.uri, json.dumps(body))
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried; expiry is minutes away
                log.warning("lease heartbeat failed (%s); retrying", e)

    def check(self) -> None:
        """Raise if the lease is no longer this run's (called before each commit)."""
        if self.lost:
            raise storage.StorageError(f"run {self.run_id} stops: {self.lost}; nothing more is committed")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            cur = self._read()
            if cur is not None and cur.body.get("run_id") == self.run_id:
                self._delete()
        except Exception as e:  # noqa: BLE001 - an unreleased lease only expires later
            log.warning("could not release the lease %s: %s", self.uri, e)


def _code(e: Exception) -> str:
    response = getattr(e, "response", None) or {}
    err, meta = response.get("Error", {}), response.get("ResponseMetadata", {})
    return str(err.get("Code") or meta.get("HTTPStatusCode") or "")
