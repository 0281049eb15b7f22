"""Ray Data ingest for Ray Train (``ingest: ray_data``).

Driver side: each split of the ``ingest.Index`` becomes a dataset of (uri, label) rows whose read
+ decode + resize to the model input runs in Ray Data tasks on any CPU of the cluster, decoded
exactly as ``tfdata`` decodes for ``ingest: driver``. Train and val are split across the workers
(``get_dataset_shard``); ``val_all`` and ``test`` reach every worker whole, for the evaluations
that every worker runs in step (MWMS). Small data is decoded once and kept in the object store
(``ingest_cache``); large data streams, decoded anew each epoch.

Worker side: a shard becomes a ``tf.data`` dataset through a generator over ``iter_batches``, so
augmentation stays in the model and Keras' ``fit`` (epochs, EarlyStopping, checkpoints) is unchanged.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import numpy as np

from crackscale.config.train import TrainConfig

log = logging.getLogger(__name__)

DECODE_BATCH = 64  # images per decode call in a Ray Data task
BLOCK_ROWS = 1000  # rows per input block: enough blocks to spread the decode over every CPU
CACHE_SHARE = 0.25  # ingest_cache auto: decode once when the decoded splits fit this share of the object store
SHUFFLE_BUFFER = 4096  # rows, as ingest: driver's tf.data shuffle
PREFETCH_BATCHES = 4  # batches Ray Data readies ahead of the generator


def decode_rows(
    batch: dict[str, np.ndarray], image_size: int, antialias: bool, storage_cfg: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Ray Data task: read and decode a batch of (uri, label) rows to uint8 model inputs, as
    ``tfdata.tf_dataset`` does (TensorFlow's decode, bilinear resize, rounded to uint8)."""
    from crackscale import storage
    from crackscale.config.loader import from_dict
    from crackscale.config.storage import StorageConfig
    from crackscale.imaging.tfdecode import decode_uint8, import_tf_or_exit

    import_tf_or_exit()  # a worker whose TensorFlow import was cut short exits cleanly
    uris = [str(u) for u in batch["uri"]]
    blobs = storage.read_many(uris, from_dict(StorageConfig, storage_cfg))
    images = (
        np.stack([decode_uint8(b, image_size, antialias).numpy() for b in blobs])
        if blobs
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return {"image": images, "label": batch["label"].astype(np.float32), "uri": batch["uri"]}


def cache_wanted(cfg: TrainConfig, rows: int, object_store_bytes: float) -> bool:
    """``ingest_cache``: true, false, or auto = when ``rows`` decoded images fit ``CACHE_SHARE`` of
    the cluster's object store."""
    if cfg.ingest_cache != "auto":
        return cfg.ingest_cache == "true"
    return rows * cfg.image_size * cfg.image_size * 3 <= CACHE_SHARE * object_store_bytes


def datasets(cfg: TrainConfig, index: Any) -> tuple[dict[str, Any], bool]:
    """({train, val, val_all, test}: Ray Data datasets of decoded images, labels and uris;
    whether they were decoded once and cached in the object store)."""
    import ray
    from ray.data import DataContext, from_arrow_refs

    from crackscale.config.loader import to_dict

    # one progress bar per dataset and epoch on every worker would bury the training log; the
    # datasets carry this context to the workers
    DataContext.get_current().enable_progress_bars = False

    def build(split: str) -> Any:
        t = index.split(split).select(["uri", "label"])
        # rows are listed class by class: mixed blocks, so that every worker's shard (and every
        # batch's BatchNorm statistics) holds both classes
        t = t.take(np.random.default_rng(cfg.seed).permutation(len(t)))
        blocks = [ray.put(t.slice(i, BLOCK_ROWS)) for i in range(0, len(t), BLOCK_ROWS)] or [ray.put(t)]
        return (
            from_arrow_refs(blocks)
            .randomize_block_order(seed=cfg.seed)
            .map_batches(
                decode_rows,
                batch_format="numpy",
                batch_size=DECODE_BATCH,
                fn_kwargs={
                    "image_size": cfg.image_size,
                    "antialias": cfg.resize_antialias,
                    "storage_cfg": to_dict(cfg.storage),
                },
            )
        )

    out = {s: build(s) for s in ("train", "val", "test")}
    cache = cache_wanted(cfg, len(index.table), ray.cluster_resources().get("object_store_memory", 0))
    if cache:
        out = {s: ds.materialize() for s, ds in out.items()}
    # val twice: split for fit's validation, whole for the evaluations every worker runs
    out["val_all"] = out["val"] if cache else build("val")
    return out, cache


def dataset_config() -> Any:
    """Train and val split across the workers; val_all and test whole on each."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=["train", "val"])


def shard_batches(rows: int, per_replica: int, replicas: int, training: bool) -> tuple[int, int, bool]:
    """(batches of ``per_replica`` a worker's pipeline yields per pass, Keras steps per epoch,
    drop_last) for a shard of ``rows``: training drops the last partial batch (as ``ingest:
    driver``) unless the shard is smaller than a batch; evaluation keeps it."""
    drop = training and rows >= per_replica
    batches = rows // per_replica if drop else math.ceil(rows / per_replica)
    steps = max(1, batches // replicas) if training else max(1, math.ceil(batches / replicas))
    return batches, steps, drop


def worker_dataset(
    name: str, rows: int, cfg: TrainConfig, per_replica: int, replicas: int, training: bool, seed: int
) -> tuple[Any, int]:
    """(``tf.data`` dataset of float32 (image, label) batches of ``per_replica`` from this worker's
    shard of ``name``, Keras steps per epoch). Training repeats the shard forever (a distributed
    dataset's iterator lives for a whole ``fit``), a new shuffled pass each time; evaluation is one
    pass per iterator."""
    import ray.train
    import tensorflow as tf

    it = ray.train.get_dataset_shard(name)
    _, steps, drop = shard_batches(rows, per_replica, replicas, training)
    passes = itertools.count()

    def one_pass() -> Any:
        shuffle = {"local_shuffle_buffer_size": min(rows, SHUFFLE_BUFFER), "local_shuffle_seed": seed + next(passes)}
        for b in it.iter_batches(
            batch_size=per_replica,
            batch_format="numpy",
            drop_last=drop,
            prefetch_batches=PREFETCH_BATCHES,
            **(shuffle if training else {}),
        ):
            yield b["image"], b["label"]

    def forever() -> Any:
        while True:
            yield from one_pass()

    size = cfg.image_size
    ds = tf.data.Dataset.from_generator(
        forever if training else one_pass,
        output_signature=(
            tf.TensorSpec((None, size, size, 3), tf.uint8),
            tf.TensorSpec((None,), tf.float32),
        ),
    )
    # uint8 through the generator (a quarter of float32's bytes); the cast runs in TensorFlow's threads
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(2), steps


def evaluation_batches(name: str, batch_size: int = 64) -> Any:
    """(images float32, labels, uris) batches of the whole dataset ``name``, in any order."""
    import ray.train

    for b in ray.train.get_dataset_shard(name).iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield b["image"].astype(np.float32), b["label"].astype(np.float32), [str(u) for u in b["uri"]]
