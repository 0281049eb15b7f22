"""tf.data input for training and evaluation: image bytes → decoded (once, cached) → batches.
TensorFlow is imported inside the functions: the driver need not load it."""

from __future__ import annotations

from typing import Any

import numpy as np

from crackscale.imaging.tfdecode import decode_uint8


def tf_dataset(
    images: list[bytes],
    labels: list[int],
    image_size: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    repeat: bool,
    shard: tuple[int, int] = (1, 0),
    *,
    antialias: bool,
    autotune: bool = True,
) -> Any:
    """Batched (image, label) dataset; decoding is cached so epochs after the first are cheap.

    ``antialias`` has no default: every caller passes the config's (or artifact's) resize, so no
    run trains with one resize and records the other. ``autotune=False`` for pipelines a
    distribution strategy iterates (see ``no_autotune_options``)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(images, dtype=tf.string), tf.constant(labels, dtype=tf.float32))
    )
    num, index = shard
    if num > 1:
        ds = ds.shard(num, index)
    ds = ds.map(
        lambda b, y: (decode_uint8(b, image_size, antialias), y),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).cache()
    if shuffle:
        ds = ds.shuffle(min(len(images), 4096), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    ds = ds.batch(batch_size, drop_remainder=repeat).prefetch(tf.data.AUTOTUNE)
    return ds if autotune else ds.with_options(no_autotune_options())


def weighted_dataset(
    parts: list[tuple[list[bytes], list[int]]],
    weights: list[float],
    image_size: int,
    batch_size: int,
    seed: int,
    shard: tuple[int, int] = (1, 0),
    *,
    antialias: bool,
    autotune: bool = True,
) -> Any:
    """Endless shuffled training batches whose items come from ``parts`` (one per source) with
    probabilities ``weights``; each part is decoded once and cached like ``tf_dataset``."""
    import tensorflow as tf

    num, index = shard
    streams = []
    for images, labels in parts:
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(images, dtype=tf.string), tf.constant(labels, dtype=tf.float32))
        )
        if num > 1:
            ds = ds.shard(num, index)
        ds = ds.map(lambda b, y: (decode_uint8(b, image_size, antialias), y), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.cache().shuffle(min(len(images), 4096), seed=seed, reshuffle_each_iteration=True).repeat()
        streams.append(ds)
    ds = tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=seed)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds if autotune else ds.with_options(no_autotune_options())


def no_autotune_options() -> Any:
    """tf.data options without the autotuning model thread (AUTOTUNE map parallelism then means one
    call per core, and prefetch buffers still grow on demand).

    Why: destroying an iterator whose model thread has run for a while (the training iterator at
    the end of each ``model.fit``) blocks for up to the thread's optimisation period, which grows to
    60 s. The thread misses the cancellation wake-up (its callback runs before the cancellation
    manager reports "cancelled") and sleeps out the period. Under MultiWorkerMirroredStrategy the
    other workers wait in the next collective meanwhile, at every phase change. Single-device
    training keeps autotuning: a plain ``model.fit`` is slower without it."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def steps(n: int, global_batch: int) -> int:
    return max(1, int(np.ceil(n / global_batch)))
