"""A scoring run: list (in a thread), score wave after wave, commit each chunk as its rows come
in, and re-run the uncommitted chunks on what remains of the cluster after a lost actor or node."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
import uuid
from typing import Any

import pyarrow as pa

from crackscale import artifact, raysession, storage
from crackscale.config.loader import ConfigError, dump
from crackscale.config.score import ScoreConfig
from crackscale.scoring import pipeline, recovery
from crackscale.scoring.commit import commit_chunk, committed, rows_table
from crackscale.scoring.keys import model_id
from crackscale.scoring.lease import Lease
from crackscale.scoring.listing import Listing
from crackscale.scoring.tiles import table as tiles_table
from crackscale.scoring.tiles import tile_side

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Run:
    """One run's identity and progress: what its commits are tagged with and what they counted."""

    cfg: ScoreConfig
    meta: dict[str, Any]
    model_id: str
    run_id: str
    run_date: str
    t0: float
    summary: dict[str, Any]
    tile: int = 0  # tile side for photos larger than a crop (0: every image scored whole)
    finished: set[str] = dataclasses.field(default_factory=set)  # chunks committed by this run
    lease: Lease | None = None  # this run's hold on (output, model)

    @classmethod
    def start(cls, cfg: ScoreConfig, t0: float, run_id: str = "", meta: dict[str, Any] | None = None) -> _Run:
        meta = meta or artifact.read_meta(cfg.model, cfg.storage)
        mid = model_id(meta)
        now = dt.datetime.now(dt.UTC)
        run_id = run_id or new_run_id()
        run_date = cfg.run_date or now.strftime("%Y-%m-%d")
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
        return cls(cfg, meta, mid, run_id, run_date, t0, summary, tile_side(meta, cfg))

    @property
    def done(self) -> int:
        return self.summary["scored"] + self.summary["failed"]


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every not-yet-scored image of ``cfg.input`` with ``cfg.model``; returns the summary.

    The run holds the lease of (output, model) from before it reads what is committed until it
    ends, handled failures included; everything before Ray starts fails fast."""
    for key in ("model", "input", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"config key '{key}' is required (--set {key}=URI)")
    cfg = dataclasses.replace(cfg, output=raysession.durable(cfg.output, "output"))
    meta = artifact.read_meta(cfg.model, cfg.storage)
    mid = model_id(meta)
    storage.check_bucket(cfg.output, cfg.storage)
    run_id = new_run_id()
    lease = Lease(cfg, mid, run_id)
    lease.acquire()
    try:
        done = committed(cfg.output, mid, cfg.storage)  # a damaged output fails here, closed
        raysession.connect(dashboard=cfg.dashboard)
        r = _Run.start(cfg, time.time(), run_id, meta)
        r.lease = lease
        listing = Listing(cfg, done)
        log.info("run %s: model %s (%s), listing %s", r.run_id, r.model_id, r.meta.get("name"), cfg.input)
        try:
            _waves(r, listing)
        finally:
            listing.stop()
        if listing.error is not None:
            raise listing.error
        r.summary.update(listing.counts)
        return _finish(r)
    finally:
        lease.release()


def _waves(r: _Run, listing: Listing) -> None:
    """Pipelines until every listed chunk is committed: one per wave of listed chunks, and after a
    lost actor or node another attempt on the uncommitted ones (up to ``max_attempts`` in a row)."""
    summary, nodes, failures = r.summary, None, 0  # nodes: after a failed attempt, those that answered
    start_by = time.time() + r.cfg.first_wave_s  # the first pipeline waits this long for the listing's end
    while True:
        todo, sizes = listing.next_wave(r.finished, start_by)
        if not todo:
            return
        if listing.error is not None:  # the chunks listed before the error are scored first
            log.error("listing failed (%s); scoring the %d chunks listed before it", listing.error, len(sizes))
        summary["attempts"] += 1
        if not failures:
            summary["waves"] += 1
            more = "" if listing.ended else ", listing goes on"
            log.info("wave %d: %d chunks (%d images)%s", summary["waves"], len(sizes), sum(sizes.values()), more)
        _same_model(r)
        failure, lost = "", set()
        try:
            _gather_and_commit(pipeline.build(todo, r.cfg, r.meta, nodes, listing.remote), sizes, r)
            failures = 0
        except Exception as e:
            failures += 1
            if failures >= r.cfg.max_attempts or not recovery.system_failure(e):
                raise
            failure = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            lost = recovery.failed_actors(e)
        if failure:  # outside the except block: the traceback (and the attempt's actors) can be freed
            log.warning(
                "attempt %d lost part of the cluster (%s); re-running the %d uncommitted chunks "
                "on the nodes that remain",
                summary["attempts"],
                failure,
                len(set(sizes) - r.finished),
            )
            nodes = recovery.end_attempt(lost) or None  # none answered (probe failed): size from ray.nodes()


def _same_model(r: _Run) -> None:
    """Before each attempt: the artifact at ``model`` is still the run's model (one model per run)."""
    now = model_id(artifact.read_meta(r.cfg.model, r.cfg.storage))
    if now != r.model_id:
        raise artifact.ArtifactError(
            f"the model at {r.cfg.model} was replaced during the run (model_id {r.model_id}, now {now}); "
            f"{r.summary['chunks']} chunks were committed with the first; run again to score the rest with the new one"
        )


def _finish(r: _Run) -> dict[str, Any]:
    """Timings into the summary; the summary and the resolved config written under ``_runs/``."""
    summary = r.summary
    elapsed = time.time() - r.t0
    summary.update(duration_s=round(elapsed, 2), throughput_img_s=round(r.done / elapsed, 1))
    if "first_result_s" in summary:  # Ray start-up, listing, model load and parity check
        summary["startup_s"] = round(summary.pop("first_result_s"), 2)
    base = storage.join(r.cfg.output, "_runs", r.run_id)
    summary["summary_uri"] = base + ".json"
    storage.write_text(base + ".yaml", dump(r.cfg), r.cfg.storage)
    storage.write_text(base + ".json", json.dumps(summary, indent=2), r.cfg.storage)
    log.info("run %s done: %s", r.run_id, json.dumps(summary))
    return summary


def _gather_and_commit(ds: Any, sizes: dict[str, int], r: _Run) -> None:
    """Buffer result rows per chunk (de-duplicated by URI: retried tasks may repeat rows) and
    commit each chunk as soon as all its keys are in; committed chunks are added to ``r.finished``."""
    import pyarrow.compute as pc
    from tqdm import tqdm

    parts: dict[str, list[pa.Table]] = {}
    seen: dict[str, set[str]] = {}
    total = r.done + sum(sizes.values())  # earlier waves' images too
    bar = tqdm(total=total, initial=r.done, desc="scoring", unit=" img", mininterval=5, disable=None)
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        for batch in batches:
            if "first_result_s" not in r.summary:  # model load, Ray start-up and listing are behind us
                r.summary["first_result_s"] = time.time() - r.t0
                r.summary["startup_images"] = batch.num_rows  # counted in the start-up period
            for cid in pc.unique(batch["chunk"]).to_pylist():
                if cid in r.finished:  # a late duplicate from a retried task
                    continue
                sub = batch.filter(pc.equal(batch["chunk"], cid))
                keys = seen.setdefault(cid, set())
                sub = sub.filter(pa.array([u not in keys for u in sub["uri"].to_pylist()], pa.bool_()))
                if not sub.num_rows:
                    continue
                keys.update(sub["uri"].to_pylist())
                parts.setdefault(cid, []).append(sub)
                if len(keys) >= sizes[cid]:
                    del seen[cid]
                    rows = _commit(pa.concat_tables(parts.pop(cid)), cid, r, total)
                    bar.update(rows)
    finally:  # stops this attempt's executor and actors now, not when the traceback is freed
        batches.close()
        bar.close()
    if parts:
        raise recovery.IncompleteChunks(f"{len(parts)} chunks came back incomplete; nothing of them was committed")


def _commit(results: pa.Table, cid: str, r: _Run, total: int) -> int:
    """Commit one whole chunk's results and count them; returns its number of rows. A row whose
    error is the run's failure (refused credentials) stops the run, the chunk uncommitted."""
    import pyarrow.compute as pc

    failures = results.filter(pc.starts_with(results["error"], storage.RUN_FAILURE))["error"]
    if len(failures):
        raise storage.CredentialsError(failures[0].as_py()[len(storage.RUN_FAILURE) :])
    if r.lease is not None:
        r.lease.check()
    rows = rows_table(results, r.meta, r.run_id)
    tiled = tiles_table(results, r.tile, r.cfg.tile_overlap, r.run_id) if r.tile else None
    uri = commit_chunk(rows, r.cfg.output, r.model_id, r.run_date, r.cfg.storage, tiles=tiled)
    r.finished.add(cid)
    ok = rows["error"].null_count
    r.summary["scored"] += ok
    r.summary["failed"] += rows.num_rows - ok
    r.summary["chunks"] += 1
    r.summary["runtime"] = rows["runtime"][0].as_py()
    rate = r.done / max(time.time() - r.t0, 1e-9)
    log.info("committed %s (%d rows): %d/%d images, %.1f img/s", uri, rows.num_rows, r.done, total, rate)
    return rows.num_rows
