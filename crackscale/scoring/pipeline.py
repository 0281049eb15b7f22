"""One attempt's Ray Data plan: listed blocks → (read + decode tasks →) model actors, sized to the
cluster as it is now."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

from crackscale.config.loader import ConfigError
from crackscale.config.score import ScoreConfig
from crackscale.imaging.tfdecode import resize_antialias
from crackscale.scoring.blocks import dataset
from crackscale.scoring.decode import decode_batch
from crackscale.scoring.keys import model_id
from crackscale.scoring.predictor import Predictor
from crackscale.scoring.tiles import tile_side

log = logging.getLogger(__name__)


def build(
    blocks: list[tuple[Any, Any]], cfg: ScoreConfig, meta: dict[str, Any], nodes: set[str] | None, remote: bool = False
) -> Any:
    """Blocks of keys → model actors that read, decode and predict (``decode: actor``), or read +
    decode tasks → model actors (``decode: tasks``); actors sized to the cluster as it is now."""
    from ray.data import ActorPoolStrategy

    n_actors, threads = layout(cfg, nodes)
    n_actors = min(n_actors, len(blocks))  # an actor per block at most (a small wave, a tiny input)
    cfg = dataclasses.replace(cfg, threads=threads)
    log.info("%d model actors, %s inference threads each", n_actors, threads or "all the node's cores as")
    decode = {
        "image_size": int(meta["image_size"]),
        "cfg": cfg,
        "antialias": resize_antialias(meta),
        "tile": tile_side(meta, cfg),
    }
    ds = dataset(blocks)
    if in_actor := decode_in_actor(cfg):  # no decoded image crosses the object store
        compute = ActorPoolStrategy(
            size=n_actors, max_concurrent_calls_per_actor=actor_calls(cfg, remote), enable_true_multi_threading=True
        )
    else:
        ds = ds.map_batches(decode_batch, batch_size=None, num_cpus=cfg.decode_cpus, fn_kwargs=decode)
        compute = ActorPoolStrategy(size=n_actors)
    # max_restarts=0: a model actor lost with its node is not restarted in place. Restarted on a
    # surviving node it can take the CPUs that re-running the lost decode outputs needs, and the
    # pipeline then waits forever; instead the attempt fails and run() starts a new one.
    with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray 2.60)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        return ds.map_batches(
            Predictor,
            batch_size=None,  # a listed block is a batch: blocks end at block_size images or block_bytes
            fn_constructor_kwargs={"cfg": cfg, "decode": decode if in_actor else None, "model_id": model_id(meta)},
            compute=compute,
            num_cpus=cfg.actor_cpus,
            num_gpus=1 if cfg.use_gpu else 0,
            max_restarts=0,
        )


def actor_calls(cfg: ScoreConfig, remote: bool) -> int:
    """Calls at once per model actor with ``decode: actor``: ``actor_calls``, else 2 when objects are
    read from S3 (one call's reads wait on the network while the other's batch is in the model; the
    model itself runs one batch at a time), else 1: a local file reads in a fraction of a
    millisecond, and a second call only makes its decode contend with the model for the actor's
    core (docs/benchmarks.md compares both)."""
    return cfg.actor_calls or (2 if remote else 1)


def decode_in_actor(cfg: ScoreConfig) -> bool:
    """``decode`` resolved: ``auto`` decodes in the model actors on CPU, in tasks with GPUs."""
    return cfg.decode == "actor" or (cfg.decode == "auto" and not cfg.use_gpu)


def layout(cfg: ScoreConfig, nodes: set[str] | None = None) -> tuple[int, int]:
    """(model actors, inference threads per actor) for an attempt.

    Actors: ``num_actors``, else one per GPU (``use_gpu``); on CPU with ``decode: actor`` one per
    ``actor_cpus`` CPUs (each reads, decodes and predicts on its own core: faster than one
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

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive") and (nodes is None or n["NodeID"] in nodes)]
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
            log.warning(
                "the remaining cluster (%d nodes, %g CPUs free for actors, %d GPUs) holds %d model actors, "
                "not %d: using %d",
                len(alive),
                cpus,
                gpus,
                max(fit, 1),
                want,
                max(fit, 1),
            )
        n = max(1, min(want, fit))
    threads = cfg.threads or (max(1, int(sum(node_cpus) // n)) if per_core else 0)
    return n, threads
