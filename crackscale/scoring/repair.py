"""``crackscale repair``: move output files that cannot be read (a zero-byte or truncated
``part-….parquet``) aside into ``<output>/_quarantine/``, so that the next run scores their images
again instead of stopping. A quarantined chunk's tiles file goes with it."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.fs as pafs

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.scoring.commit import QUARANTINE_DIR, TILES_DIR, unreadable

log = logging.getLogger(__name__)


def repair(output: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Quarantine the unreadable files under ``output``; returns what was moved where."""
    fs, root = storage.resolve(output, cfg)
    root = root.rstrip("/")
    moved = []
    for path, reason in unreadable(fs, root):
        rel = path[len(root) + 1 :]
        related = [rel] if rel.startswith(TILES_DIR + "/") else [rel, f"{TILES_DIR}/{rel}"]
        for r in related:
            src = f"{root}/{r}"
            if r != rel and fs.get_file_info(src).type != pafs.FileType.File:  # the chunk had no tiles
                continue
            dest = f"{root}/{QUARANTINE_DIR}/{r}"
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            fs.move(src, dest)
            moved.append({"file": storage.uri_of(output, src), "to": storage.uri_of(output, dest), "reason": reason})
            log.warning("quarantined %s (%s)", src, reason)
    return {
        "output": output,
        "quarantined": moved,
        "next_run": "scores the images of the quarantined chunks again" if moved else "nothing to do",
    }
