"""What a training worker reads: each split's images as distributed ``tf.data`` input (from the
object store with ``ingest: driver``, from Ray Data shards with ``ingest: ray_data``), in order for
evaluation, and the few images the artifact's exports are calibrated and measured on."""

from __future__ import annotations

from typing import Any

import numpy as np

from crackscale import model as M
from crackscale.config.train import TrainConfig
from crackscale.training import tfdata
from crackscale.training.strategy import multi_device


def epoch_shares(cfg: TrainConfig, names: list[str]) -> dict[str, float] | None:
    """Each source's share of a training epoch, or None when no source sets a ``weight`` (then an
    epoch is every training item once, in shuffled order). Weighted sources get their weight
    (scaled down together if they leave nothing); the others share the rest by their size."""
    weights = {s.label(): s.weight for s in cfg.data if s.weight > 0}
    if not weights:
        return None
    sizes = {n: names.count(n) for n in dict.fromkeys(names)}
    weights = {n: w for n, w in weights.items() if sizes.get(n)}
    rest = {n: k for n, k in sizes.items() if n not in weights}
    left = max(0.0, 1.0 - sum(weights.values())) if rest else 0.0
    shares = {**weights, **{n: left * k / sum(rest.values()) for n, k in rest.items()}}
    total = sum(shares.values()) or 1.0
    return {n: v / total for n, v in shares.items()}


def distributed(
    strategy: Any,
    images: list[bytes],
    labels: list[int],
    cfg: TrainConfig,
    training: bool,
    names: list[str] | None = None,
) -> Any:
    """The split as input for ``model.fit`` under ``strategy``; training batches are drawn from
    each source by its ``epoch_shares`` when sources set weights (``names``: each item's source)."""
    per_replica = max(1, cfg.batch_size // strategy.num_replicas_in_sync)
    autotune = not multi_device(strategy)
    shares = epoch_shares(cfg, names) if (training and names) else None

    def fn(ctx: Any) -> Any:
        if shares:
            parts = [
                ([im for im, n in zip(images, names) if n == name], [y for y, n in zip(labels, names) if n == name])
                for name in shares
            ]
            return tfdata.weighted_dataset(
                parts,
                list(shares.values()),
                cfg.image_size,
                per_replica,
                seed=cfg.seed + ctx.input_pipeline_id,
                shard=(ctx.num_input_pipelines, ctx.input_pipeline_id),
                antialias=cfg.resize_antialias,
                autotune=autotune,
            )
        return tfdata.tf_dataset(
            images,
            labels,
            cfg.image_size,
            per_replica,
            shuffle=training,
            seed=cfg.seed + ctx.input_pipeline_id,
            repeat=True,
            shard=(ctx.num_input_pipelines, ctx.input_pipeline_id),
            antialias=cfg.resize_antialias,
            autotune=autotune,
        )

    return strategy.distribute_datasets_from_function(fn)


def in_order(cfg: TrainConfig, images: list[bytes], labels: list[int], autotune: bool = True) -> Any:
    """``images`` decoded and resized as for evaluation, in order, batches of 64."""
    return tfdata.tf_dataset(
        images,
        labels,
        cfg.image_size,
        64,
        shuffle=False,
        seed=0,
        repeat=False,
        antialias=cfg.resize_antialias,
        autotune=autotune,
    )


class DriverSplits:
    """``ingest: driver``: every split's image bytes, from the object store, in manifest order."""

    def __init__(self, config: dict[str, Any], cfg: TrainConfig, autotune: bool) -> None:
        import ray

        self.cfg, self.config, self.autotune = cfg, config, autotune
        self.splits = ray.get(config["data"])

    def fit_data(self, strategy: Any, split: str, training: bool) -> tuple[Any, int]:
        images, labels, names = self.splits[split]
        return distributed(strategy, images, labels, self.cfg, training, names), tfdata.steps(
            len(images), self.cfg.batch_size
        )

    def predict(self, mdl: Any, split: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """(probabilities, labels, uris, source names) of every item of ``split``."""
        images, labels, names = self.splits[split]
        p = M.predict(mdl, in_order(self.cfg, images, labels, self.autotune)) if images else np.zeros(0)
        uris = self.config["test_uris"] if split == "test" else [""] * len(images)
        return p, np.asarray(labels), uris, list(names)

    def export_images(self) -> tuple[list[bytes], list[bytes], list[bytes], list[int], list[str]]:
        """(64 validation images for the parity checks, the int8 calibration images, the images,
        labels and sources the int8 export is measured on), as encoded bytes."""
        (tr_x, tr_y, _), (va_x, va_y, va_n) = self.splits["train"], self.splits["val"]
        vx, vy = measured(va_x, va_y, self.cfg.seed)
        vn, _ = measured(list(va_n), va_y, self.cfg.seed)  # the same picks: they depend on the count only
        return va_x[:64], representative(tr_x, tr_y, self.cfg.seed), vx, vy, vn


class RayDataSplits:
    """``ingest: ray_data``: this worker's shards of train and val, the whole of val and test, and
    the few images the exports need, read from storage by URI."""

    def __init__(self, config: dict[str, Any], cfg: TrainConfig, world_size: int, autotune: bool) -> None:
        self.cfg, self.config, self.world, self.autotune = cfg, config, world_size, autotune

    def fit_data(self, strategy: Any, split: str, training: bool) -> tuple[Any, int]:
        from crackscale.training import raydata

        per_replica = max(1, self.cfg.batch_size // strategy.num_replicas_in_sync)
        replicas = strategy.num_replicas_in_sync // self.world
        rows = self.config["rows"][split] // self.world  # streaming_split(equal=True) drops the rest
        steps: list[int] = []

        def fn(ctx: Any) -> Any:
            ds, n = raydata.worker_dataset(
                split, rows, self.cfg, per_replica, replicas, training, self.cfg.seed + ctx.input_pipeline_id
            )
            steps.append(n)
            return ds if self.autotune else ds.with_options(tfdata.no_autotune_options())

        ds = strategy.distribute_datasets_from_function(fn)
        return ds, steps[0]

    def predict(self, mdl: Any, split: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """(probabilities, labels, uris, source names): one source, a crop tree."""
        import tensorflow as tf

        from crackscale.training import raydata

        fn = tf.function(lambda x: mdl(x, training=False))
        p, y, uris = [], [], []
        for x, labels, names in raydata.evaluation_batches("val_all" if split == "val" else split):
            p.append(fn(x).numpy().reshape(-1))
            y.append(labels)
            uris.extend(names)
        source = self.cfg.data[0].label() if self.cfg.data else ""
        y_ = np.concatenate(y) if y else np.zeros(0)
        return (np.concatenate(p) if p else np.zeros(0)), y_, uris, [source] * len(y_)

    def export_images(self) -> tuple[list[bytes], list[bytes], list[bytes], list[int], list[str]]:
        from crackscale import storage

        picks = self.config["export_uris"]

        def read(uris: list[str]) -> list[bytes]:
            return storage.read_many(uris, self.cfg.storage)

        measured_y = picks["measured_labels"]
        source = self.cfg.data[0].label() if self.cfg.data else ""
        return (
            read(picks["check"]),
            read(picks["representative"]),
            read(picks["measured"]),
            measured_y,
            [source] * len(measured_y),
        )


def representative(images: list[bytes], labels: list[int], seed: int, n: int = 200) -> list[bytes]:
    """Up to ``n`` training images for int8 calibration, half of each class, seeded."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    picks = [rng.permutation(np.flatnonzero(y == c))[: n // 2] for c in (0, 1)]
    return [images[i] for i in sorted(np.concatenate(picks).astype(int))]


MEASURED_MAX = 2000  # validation images the int8 export is measured on (decoded at once, in memory)


def measured(images: list, labels: list[int], seed: int, n: int = MEASURED_MAX) -> tuple[list, list[int]]:
    """The validation images the int8 export is measured on: all of them, or ``n`` seeded ones."""
    if len(images) <= n:
        return images, labels
    keep = sorted(np.random.default_rng(seed).permutation(len(images))[:n].tolist())
    return [images[i] for i in keep], [labels[i] for i in keep]


def decoded(cfg: TrainConfig, images: list[bytes]) -> np.ndarray:
    """Encoded images as the model sees them at evaluation (NHWC float32 0..255)."""
    if not images:
        return np.zeros((0, cfg.image_size, cfg.image_size, 3), np.float32)
    return np.concatenate([x.numpy() for x, _ in in_order(cfg, images, [0] * len(images))])
