"""A scoring run: list (in a thread), score wave after wave, commit each chunk as its rows come
in, and re-run the uncommitted chunks on what remains of the cluster after a lost actor or node."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from typing import Any

import pyarrow as pa

from crackscale import artifact, raysession, storage
from crackscale.config import ConfigError, ScoreConfig, dump
from crackscale.scoring import pipeline, recovery
from crackscale.scoring.commit import commit_chunk, committed, rows_table
from crackscale.scoring.keys import model_id
from crackscale.scoring.listing import Listing

log = logging.getLogger(__name__)


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every not-yet-scored image of ``cfg.input`` with ``cfg.model``; returns the summary."""
    for key in ("model", "input", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"config key '{key}' is required (--set {key}=URI)")
    raysession.connect(dashboard=cfg.dashboard)
    t0 = time.time()
    meta = artifact.read_meta(cfg.model, cfg.storage)
    mid = model_id(meta)
    storage.check_bucket(cfg.output, cfg.storage)
    now = dt.datetime.now(dt.UTC)
    run_id = now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    run_date = cfg.run_date or now.strftime("%Y-%m-%d")
    listing = Listing(cfg, committed(cfg.output, mid, cfg.storage))
    log.info("run %s: model %s (%s), listing %s", run_id, mid, meta.get("name"), cfg.input)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "model_id": mid,
        "model_name": meta.get("name"),
        "model": cfg.model,
        "input": cfg.input,
        "output": cfg.output,
        "run_date": run_date,
        "listed": 0,
        "already_scored": 0,
        "scored": 0,
        "failed": 0,
        "chunks": 0,
        "runtime": None,
        "attempts": 0,
        "waves": 0,
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
                log.info(
                    "wave %d: %d chunks (%d images)%s",
                    summary["waves"],
                    len(sizes),
                    sum(sizes.values()),
                    "" if listing.ended else ", listing goes on",
                )
            failure, lost = "", set()
            try:
                _gather_and_commit(
                    pipeline.build(todo, cfg, meta, nodes, listing.remote),
                    sizes,
                    finished,
                    cfg,
                    meta,
                    mid,
                    run_id,
                    run_date,
                    summary,
                    t0,
                )
                failures = 0
            except Exception as e:
                failures += 1
                if failures >= cfg.max_attempts or not recovery.system_failure(e):
                    raise
                failure = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                lost = recovery.failed_actors(e)
            if failure:  # outside the except block: the traceback (and the attempt's actors) can be freed
                log.warning(
                    "attempt %d lost part of the cluster (%s); re-running the %d uncommitted chunks "
                    "on the nodes that remain",
                    summary["attempts"],
                    failure,
                    len(set(sizes) - finished),
                )
                nodes = recovery.end_attempt(lost) or None  # none answered (probe failed): size from ray.nodes()
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


def _gather_and_commit(
    ds: Any,
    sizes: dict[str, int],
    finished: set[str],
    cfg: ScoreConfig,
    meta: dict[str, Any],
    mid: str,
    run_id: str,
    run_date: str,
    summary: dict[str, Any],
    t0: float,
) -> None:
    """Buffer result rows per chunk (de-duplicated by URI: retried tasks may repeat rows) and
    commit each chunk as soon as all its keys are in; committed chunks are added to ``finished``."""
    import pyarrow.compute as pc

    parts: dict[str, list[pa.Table]] = {}
    seen: dict[str, set[str]] = {}
    total = summary["scored"] + summary["failed"] + sum(sizes.values())  # earlier waves' images too
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=summary["scored"] + summary["failed"],
        desc="scoring",
        unit=" img",
        mininterval=5,
        disable=None,
    )
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
                rows = rows_table(pa.concat_tables(parts.pop(cid)), meta, run_id)
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
                log.info(
                    "committed %s (%d rows): %d/%d images, %.1f img/s",
                    uri,
                    rows.num_rows,
                    done,
                    total,
                    done / max(time.time() - t0, 1e-9),
                )
    finally:  # stops this attempt's executor and actors now, not when the traceback is freed
        batches.close()
        bar.close()
    if parts:
        raise recovery.IncompleteChunks(f"{len(parts)} chunks came back incomplete; nothing of them was committed")
