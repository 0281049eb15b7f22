"""``ScoreConfig``: one batch-scoring run (``jobs/score.py``, ``crackscale score``; ``query``,
``report`` and ``doctor`` read its ``output`` and ``storage``)."""

from __future__ import annotations

import dataclasses
import re

from crackscale.config.loader import check, setting
from crackscale.config.storage import StorageConfig


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring config. Keys: docs/configuration.md, "ScoreConfig"."""

    model: str = setting(
        "",
        group="Inputs and outputs",
        help="Model artifact URI (local directory or s3://), as written by training or tuning; required",
    )
    input: str = setting(
        "",
        group="Inputs and outputs",
        help=(
            "Images to score: a prefix (local directory or s3://bucket/prefix/) or a manifest "
            "(.txt, .csv or .parquet); required"
        ),
    )
    output: str = setting(
        "",
        group="Inputs and outputs",
        help=(
            "Parquet output root (local directory or s3://bucket/prefix/); required. "
            "Images this model already scored there are skipped"
        ),
    )
    extensions: tuple[str, ...] = setting(
        (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"),
        group="Inputs and outputs",
        help="Listed files kept, by suffix (case-insensitive); manifest entries are not filtered",
    )
    tile_size: int = setting(
        0,
        group="Whole photos",
        help=(
            "Tile side in source pixels for photos larger than a crop; 0 = the artifact's source_size "
            "(the crop size it learned from; an artifact without one scores every image whole)"
        ),
    )
    tile_overlap: float = setting(
        0.0,
        group="Whole photos",
        help="Share of a tile's side that neighbouring tiles overlap, in [0, 0.9); edge tiles are shifted inward",
    )
    tile_above: float = setting(
        1.5,
        group="Whole photos",
        help=(
            "A photo is cut into tiles when its longer side exceeds this many tile sides (> 1); "
            "smaller images are resized whole, as crops are"
        ),
    )
    runtime: str = setting(
        "auto",
        group="Model runtime",
        help=(
            "auto = tf.keras on GPU; on CPU the artifact's int8 LiteRT model when its validation quality holds "
            "(recall at least tf.keras's, accuracy within 0.2 points), else fp32 LiteRT if its parity check passes, "
            "else tf.keras; litert = fp32 LiteRT, failing if the parity check fails; litert-int8 = the int8 "
            "model whatever its quality (failing if the artifact has none); tf = tf.keras always"
        ),
    )
    mixed_precision: str = setting(
        "auto",
        group="Model runtime",
        help=(
            "float16 compute for tf.keras (float32 weights and probabilities): auto = on GPUs when the "
            "artifact's recorded float16 parity holds (max |Δp| <= 0.01, no changed decision); true = always "
            "(CPU too); false = never"
        ),
    )
    parity_tolerance: float = setting(
        1e-4,
        group="Model runtime",
        help="Largest |Δp| between LiteRT and tf.keras on sample images for LiteRT to be used (> 0)",
    )
    batch_size: int = setting(
        0,
        group="Model runtime",
        help=(
            "Images per model call; 0 = per runtime: 4 with LiteRT (small batches stay in CPU caches), 64 with tf.keras"
        ),
    )
    block_size: int = setting(
        256,
        group="Pipeline",
        help="Images per Ray Data batch: one model-actor call (and one decode-task call with decode: tasks) each",
    )
    block_bytes: int = setting(
        4_000_000,
        group="Pipeline",
        help=(
            "A block also ends at this many bytes of listed objects, so that big photos (many tiles each) "
            "spread over the actors; 0 = blocks of block_size images only"
        ),
    )
    chunk_size: int = setting(
        2000,
        group="Pipeline",
        help="Images per committed Parquet file: the unit of the exactly-once commit and of re-work after a failure",
    )
    num_actors: int = setting(
        0,
        group="Pipeline",
        help=(
            "Model actors; 0 = one per GPU with use_gpu, on CPU one per actor_cpus CPUs with decode: actor, "
            "else one per CPU node"
        ),
    )
    use_gpu: bool = setting(
        False, group="Pipeline", help="Score on GPUs: one actor per GPU, tf.keras with memory growth"
    )
    actor_cpus: float = setting(
        1.0,
        group="Pipeline",
        help=(
            "Ray CPUs reserved per model actor; with decode: tasks keep it different from decode_cpus, "
            "or Ray fuses the decode tasks into the actors"
        ),
    )
    threads: int = setting(
        0,
        group="Pipeline",
        help=(
            "Inference threads per actor; 0 = the cluster's CPUs divided by the actors with decode: actor on CPU, "
            "else all cores of the actor's node"
        ),
    )
    decode_cpus: float = setting(
        0.5,
        group="Pipeline",
        help="Ray CPUs per read+decode task with decode: tasks (> 0; below 1 lets reads and decoding overlap)",
    )
    decode: str = setting(
        "auto",
        group="Pipeline",
        help=(
            "Where images are read and decoded: actor (inside each model actor), tasks (separate Ray tasks "
            "feeding the actors), auto = actor on CPU, tasks with use_gpu"
        ),
    )
    decoder: str = setting(
        "auto",
        group="Pipeline",
        help=(
            "auto = decode JPEGs without TensorFlow (same pixels) where the artifact and the image allow it, "
            "else with TensorFlow; tf = TensorFlow for every image"
        ),
    )
    read_threads: int = setting(
        16,
        group="Pipeline",
        help="Concurrent object reads per decode call on S3 (>= 1); raise it for high-latency endpoints",
    )
    actor_calls: int = setting(
        0,
        group="Pipeline",
        help=(
            "With decode: actor, batches a model actor works on at once; 0 = 2 if any input is on S3 "
            "(reads overlap inference), else 1"
        ),
    )
    list_threads: int = setting(
        16, group="Pipeline", help="Folders of an S3 input prefix listed at the same time (>= 1); 1 = one flat listing"
    )
    first_wave_s: float = setting(
        60.0,
        group="Pipeline",
        help=(
            "Scoring starts when the listing ends or after this many seconds of it, on the chunks listed so far; "
            "0 = at the first chunk"
        ),
    )
    max_attempts: int = setting(
        3,
        group="Limits",
        help="Pipeline attempts per wave (>= 1): after a lost actor or node the uncommitted chunks run again",
    )
    max_pixels: int = setting(
        120_000_000,
        group="Limits",
        help=(
            "Images with more pixels are refused before decoding (decompression-bomb guard); "
            "the default admits 100 MP photos"
        ),
    )
    run_date: str = setting("", group="Run", help='Output partition date YYYY-MM-DD; "" = today (UTC)')
    cache_dir: str = setting(
        "",
        group="Run",
        help=(
            'Cache of LiteRT exports for artifacts that carry none, keyed by model SHA-256; "" = <tmp>/crackscale-cache'
        ),
    )
    lease_ttl_s: float = setting(
        300.0,
        group="Run",
        help=(
            "A run holds a lease on (output, model) and renews it every quarter of this; a lease without "
            "renewal for this long belongs to a dead run and is taken over"
        ),
    )
    wait_for_lease: bool = setting(
        False,
        group="Run",
        help="When another run holds the lease: wait for it (true, --wait) or stop with one line naming it",
    )
    report_ahead: bool = setting(
        True,
        group="Run",
        help=(
            "Prepare the run's report while the run scores: its libraries imported on a thread, or, for an "
            "artifact without a heatmap export (crackscale export --heatmap), a process that imports TensorFlow "
            "and loads the model for Grad-CAM (the driver's node holds its memory meanwhile); false = everything "
            "after the last commit"
        ),
    )
    dashboard: bool = setting(
        False,
        group="Run",
        help="Only with RAY_ADDRESS=local, where the job starts its own Ray: start that Ray's dashboard too",
    )
    storage: StorageConfig = setting(
        StorageConfig(), group="Run", help="S3 connection settings for the model, the input and the output"
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key (required keys are checked by run())."""

        check(
            self.runtime in ("auto", "litert", "litert-int8", "tf"),
            "config key 'runtime' must be auto, litert, litert-int8 or tf",
        )
        check(
            self.mixed_precision in ("auto", "true", "false"),
            "config key 'mixed_precision' must be auto, true or false",
        )
        check(self.decode in ("auto", "tasks", "actor"), "config key 'decode' must be auto, tasks or actor")
        check(self.decoder in ("auto", "tf"), "config key 'decoder' must be auto or tf")
        check(self.batch_size >= 0, "config key 'batch_size' must be >= 0 (0 = per runtime)")
        check(self.block_size > 0, "config key 'block_size' must be positive")
        check(self.block_bytes >= 0, "config key 'block_bytes' must be >= 0 (0 = by count only)")
        check(self.chunk_size > 0, "config key 'chunk_size' must be positive")
        check(self.num_actors >= 0, "config key 'num_actors' must be >= 0")
        check(self.actor_cpus >= 0 and self.decode_cpus > 0, "actor_cpus must be >= 0 and decode_cpus > 0")
        check(self.threads >= 0, "config key 'threads' must be >= 0")
        check(self.read_threads >= 1, "config key 'read_threads' must be >= 1")
        check(self.actor_calls >= 0, "config key 'actor_calls' must be >= 0 (0 = by input)")
        check(self.list_threads >= 1, "config key 'list_threads' must be >= 1")
        check(self.first_wave_s >= 0, "config key 'first_wave_s' must be >= 0")
        check(self.max_attempts >= 1, "config key 'max_attempts' must be >= 1")
        check(self.max_pixels > 0, "config key 'max_pixels' must be positive")
        check(self.parity_tolerance > 0, "config key 'parity_tolerance' must be positive")
        check(self.tile_size >= 0, "config key 'tile_size' must be >= 0 (0 = the artifact's source_size)")
        check(0 <= self.tile_overlap < 0.9, "config key 'tile_overlap' must be in [0, 0.9)")
        check(self.tile_above > 1, "config key 'tile_above' must be > 1")
        check(self.lease_ttl_s > 0, "config key 'lease_ttl_s' must be positive")
        check(
            all(e.startswith(".") for e in self.extensions),
            "config key 'extensions' must list suffixes starting with '.', e.g. .jpg",
        )
        check(
            not self.run_date or bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.run_date)),
            "config key 'run_date' must look like YYYY-MM-DD",
        )
