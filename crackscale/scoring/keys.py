"""Identities: which model scored (``model_id``), which image (``key_hash``), and a compact set of
image keys (``KeySet``) for the keys already committed and for a manifest's repeats."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from crackscale.artifact import ArtifactError


def model_id(meta: dict[str, Any]) -> str:
    """Identity of "scored by that model": the first 16 hex digits of the model file's SHA-256."""
    sha = str(meta.get("model_sha256") or "")
    if len(sha) < 16:
        raise ArtifactError("model.json has no model_sha256: cannot tell which images it scored")
    return sha[:16]


def version(etag: str | None, size: int | None, mtime_us: int | None) -> str:
    """Which content of an object was scored: its ETag, else its size and modification time (local
    files), else "" (a manifest entry without either: the URI alone)."""
    if etag:
        return f"e:{etag}"
    if mtime_us is not None and mtime_us >= 0:
        return f"m:{size}:{mtime_us}"
    return ""


def scored_key(uri: str, ver: str) -> bytes:
    """The key of "this content of this URI was scored": a changed object is a new key."""
    return key_hash(f"{uri}\n{ver}" if ver else uri)


def key_hash(uri: str) -> bytes:
    """16-byte hash of a URI plus a 0x01 sentinel: numpy's fixed-width bytes dtype strips trailing
    NUL bytes, so a hash ending in 0x00 would never match itself in the sorted array."""
    return hashlib.blake2b(uri.encode(), digest_size=16).digest() + b"\x01"


class KeySet:
    """A set of ``key_hash`` values in 16 B each: new ones in a Python set, merged every ``merge_at``
    keys into two sorted uint64 arrays (the digest's two halves; a Python set of the byte strings
    takes several times the memory). Used for the keys already committed and for a manifest's
    repeats."""

    def __init__(self, merge_at: int = 1_000_000) -> None:
        self._hi = np.zeros(0, dtype=np.uint64)  # sorted; _lo[i] is the other half of _hi[i]'s key
        self._lo = np.zeros(0, dtype=np.uint64)
        self._recent: set[bytes] = set()
        self._merge_at = merge_at

    @staticmethod
    def _halves(hashes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        b = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 17)  # 16 digest bytes + a sentinel
        return (
            b[:, :8].copy().view("<u8").ravel().astype(np.uint64),
            b[:, 8:16].copy().view("<u8").ravel().astype(np.uint64),
        )

    @classmethod
    def of_distinct(cls, batches: Iterator[list[bytes]]) -> KeySet:
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
