"""``TrainConfig``: everything one training run needs (``jobs/train.py``, ``crackscale train``)."""

from __future__ import annotations

import dataclasses

from crackscale.config.loader import check, setting
from crackscale.config.storage import StorageConfig


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One training source: a labelled-crop tree or a photo set with masks. Keys: docs/configuration.md."""

    uri: str = setting(
        "",
        help=(
            "Local path or s3:// prefix: a labelled-crop tree (<uri>/<class>/<files>) or a photo set "
            "(<uri>/photos/ + <uri>/masks/, one mask per photo with the same stem)"
        ),
    )
    name: str = setting("", help='Name in tables and model.json; "" = the last part of uri')
    weight: float = setting(
        0.0,
        help=(
            "Share of each training epoch drawn from this source, in [0, 1]; 0 = by its size "
            "(sources without a weight share what the weighted ones leave, in proportion to their size)"
        ),
    )
    group_pattern: str = setting(
        "",
        help=(
            'Source-photo key of a file name (as the top-level group_pattern); "" = the top-level '
            "group_pattern for crops, the photo itself for photo sets"
        ),
    )
    group_size: int = setting(0, help="Bucket size for numeric keys (as the top-level group_size); 0 = the top-level")
    target_recall: float = setting(
        0.0,
        help=(
            "Recall on this source's validation items that the decision threshold must keep, in (0, 1]; "
            "0 = the top-level target_recall"
        ),
    )

    @classmethod
    def from_string(cls, value: str) -> SourceConfig:
        """A bare URI in YAML or ``--set data=a,b``."""
        return cls(uri=value)

    def label(self) -> str:
        """The source's name in tables: ``name``, else the last part of its URI."""
        return self.name or self.uri.rstrip("/").rsplit("/", 1)[-1]

    def validate(self) -> None:
        check(bool(self.uri), "config key 'data[].uri' must name a folder or s3:// prefix")
        check(0 <= self.weight <= 1, f"config key 'data[].weight' of {self.uri} must be in [0, 1]")
        check(self.group_size >= 0, f"config key 'data[].group_size' of {self.uri} must be >= 0")
        check(0 <= self.target_recall <= 1, f"config key 'data[].target_recall' of {self.uri} must be in [0, 1]")


def sources_of(value: object) -> tuple[SourceConfig, ...]:
    """``data`` as given to ``TrainConfig(...)`` in code: a URI, comma-separated URIs, or sources."""
    if isinstance(value, str):
        return tuple(SourceConfig(uri=v.strip()) for v in value.split(",") if v.strip())
    return tuple(v if isinstance(v, SourceConfig) else SourceConfig(**v) for v in value)  # type: ignore[union-attr]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Keys: docs/configuration.md, "TrainConfig"."""

    data: tuple[SourceConfig, ...] = setting(
        (),
        group="Data",
        help=(
            "Training sources: one or a list, each a URI or a mapping of source keys; a labelled-crop tree "
            "<uri>/<class>/<files> or a photo set <uri>/photos + <uri>/masks (docs/training.md#sources); "
            '"" = generate synthetic demo images into synth_dir'
        ),
    )
    class_names: tuple[str, ...] = setting(
        ("Negative", "Positive"), group="Data", help="The two class folders under data (exactly two)"
    )
    crack_class: str = setting(
        "Positive",
        group="Data",
        help="Which of class_names is the crack class: the model outputs the probability of this class",
    )
    extensions: tuple[str, ...] = setting(
        (".jpg", ".jpeg", ".png"), group="Data", help="File suffixes listed as images under data (case-insensitive)"
    )
    group_pattern: str = setting(
        r"(\d+)",
        group="Data",
        help=(
            "Regular expression on the file name whose group 1 is the source-photo key; "
            "files with the same key always land in the same split"
        ),
    )
    group_size: int = setting(
        50,
        group="Data",
        help=(
            "Numeric source-photo keys are bucketed by this many (>= 1), so neighbouring crops of one photo "
            "share a split; 1 = every number is its own group"
        ),
    )
    val_fraction: float = setting(
        0.2,
        group="Data",
        help=(
            "Share of each class's groups held out for validation (early stopping, decision threshold), between 0 and 1"
        ),
    )
    test_fraction: float = setting(
        0.1,
        group="Data",
        help=(
            "Share of each class's groups held out for the final test metrics, in [0, 1); "
            "val_fraction + test_fraction must stay below 1"
        ),
    )
    limit_per_class: int = setting(
        0, group="Data", help="0 = use every image; N > 0 keeps only the first N files of each class, for quick runs"
    )
    seed: int = setting(
        42,
        group="Data",
        help=(
            "Seed of the split order, the shuffling and the synthetic demo images; another seed gives another "
            "grouped split"
        ),
    )
    synth_per_class: int = setting(200, group="Data", help='Synthetic images generated per class when data is ""')
    synth_dir: str = setting("demo/data", group="Data", help='Where synthetic images are written when data is ""')
    source_size: int = setting(
        0,
        group="Data",
        help=(
            "Side in pixels of the crops the model learns from, recorded in the artifact: scoring cuts larger "
            "photos into tiles of this size; 0 = learn it from the training images (their most common longer side)"
        ),
    )
    tile_overlap: float = setting(
        0.0,
        group="Data",
        help=(
            "Photo sets: share of a tile's side that neighbouring tiles overlap, in [0, 0.9); the grid scoring "
            "cuts photos on (score with the same tile_overlap)"
        ),
    )
    tile_above: float = setting(
        1.5,
        group="Data",
        help=(
            "Photo sets: a photo is cut into tiles when its longer side exceeds this many tile sides (> 1), "
            "as in scoring"
        ),
    )
    mask_min_pixels: int = setting(
        100,
        group="Data",
        help=(
            "Photo sets: a tile is a crack tile when its window of the mask holds at least this many crack "
            "pixels (>= 1)"
        ),
    )
    mask_margin: int = setting(
        16,
        group="Data",
        help=(
            "Photo sets: a tile is clean when its window grown by this many pixels on every side holds no crack "
            "pixel; tiles between clean and crack are left out"
        ),
    )
    image_size: int = setting(
        160,
        group="Model",
        help=(
            "Square model input in pixels (>= 32) that images are resized to; larger is slower and can be more accurate"
        ),
    )
    resize_antialias: bool = setting(
        False,
        group="Model",
        help=(
            "Resize with antialiasing (true) or plain bilinear (false); recorded in model.json so scoring resizes "
            "the same way. true costs more decode CPU in training and in every scoring run"
        ),
    )
    alpha: float = setting(
        1.0,
        group="Model",
        help="MobileNetV2 width multiplier: 0.35, 0.5, 0.75, 1.0, 1.3 or 1.4; smaller is faster and less accurate",
    )
    weights: str = setting(
        "imagenet",
        group="Model",
        help=(
            "Initial base weights: imagenet (downloaded by Keras), none (train from scratch), "
            "or a path or s3:// URI of a MobileNetV2 no-top .h5 file"
        ),
    )
    bn_momentum: float = setting(
        0.0,
        group="Model",
        help="BatchNorm momentum in [0, 1); 0 = auto: 0.999 with pretrained weights, 0.9 from scratch",
    )
    dropout: float = setting(0.3, group="Model", help="Dropout rate before the classifier layer, in [0, 1)")
    flip: bool = setting(True, group="Model", help="Augmentation: random horizontal flips during training")
    flip_vertical: bool = setting(
        False,
        group="Model",
        help=(
            "Augmentation: random vertical flips too (cracks have no up or down; with rotation 0.25 every turn is seen)"
        ),
    )
    brightness: float = setting(
        0.0,
        group="Model",
        help=(
            "Augmentation: random brightness shift up to this fraction of the 0..255 range either way, "
            "in [0, 1); 0 = off"
        ),
    )
    contrast: float = setting(
        0.0,
        group="Model",
        help="Augmentation: random contrast factor in [1 - contrast, 1 + contrast], contrast in [0, 1); 0 = off",
    )
    rotation: float = setting(
        0.2,
        group="Model",
        help="Augmentation: random rotation during training, up to this fraction of a full turn either way; 0 = off",
    )
    freeze_base: str = setting(
        "auto",
        group="Model",
        help=(
            'Head phase: freeze the base network. auto = only with pretrained weights, or "true" / "false" '
            "(quoted in YAML: the key is a string)"
        ),
    )
    batch_size: int = setting(
        32, group="Schedule", help="Global batch size, split over all replicas whatever their number"
    )
    head_epochs: int = setting(
        10,
        group="Schedule",
        help="Epochs of phase 1, the classifier head (Adam); head_epochs + fine_tune_epochs must be > 0",
    )
    head_lr: float = setting(1e-4, group="Schedule", help="Learning rate of phase 1 (Adam)")
    fine_tune_epochs: int = setting(
        10, group="Schedule", help="Epochs of phase 2, fine-tuning the base (RMSprop); 0 = no fine-tuning"
    )
    fine_tune_lr: float = setting(1e-5, group="Schedule", help="Learning rate of phase 2 (RMSprop)")
    fine_tune_at: int = setting(
        100,
        group="Schedule",
        help="Base layers from this index on are trained in phase 2; lower trains more of the network",
    )
    warmup_epochs: int = setting(
        0,
        group="Schedule",
        help=(
            "Phase 1 starts with this many epochs whose learning rate rises linearly to head_lr "
            "(epoch i of w gets (i + 1) / (w + 1)); the schedule's decay follows them"
        ),
    )
    label_smoothing: float = setting(
        0.0,
        group="Schedule",
        help="Label smoothing of the training loss, in [0, 0.5): targets become 0 + s/2 and 1 - s/2",
    )
    swa_epochs: int = setting(
        0,
        group="Schedule",
        help=(
            "Weight averaging: phase 1 ends with the mean of the weights of its last this many epochs "
            "(instead of its best epoch's), BatchNorm statistics recomputed on one pass over the training "
            "split; 0 = off"
        ),
    )
    lr_schedule: str = setting(
        "constant",
        group="Schedule",
        help=(
            "constant, or cosine: each phase's learning rate decays per epoch from its lr along a half cosine "
            "(a resumed run continues the curve)"
        ),
    )
    patience: int = setting(
        3,
        group="Schedule",
        help=(
            "Early stopping per phase: epochs without a better val_loss before the phase stops "
            "(its best weights are restored)"
        ),
    )
    min_epochs: int = setting(
        0,
        group="Schedule",
        help="Per phase, early stopping neither stops nor picks a best epoch before this many epochs; 0 = no minimum",
    )
    target_recall: float = setting(
        0.99,
        group="Schedule",
        help=(
            "The decision threshold is the highest that keeps this recall on validation, in (0, 1]; "
            "raise it where a missed crack costs more than a false alarm"
        ),
    )
    ingest: str = setting(
        "driver",
        group="Cluster",
        help=(
            "How images reach the workers. driver: the driver reads every image once and puts the bytes in "
            "Ray's object store, each worker decodes all it needs (data that fits in memory). ray_data: the "
            "driver holds one small row per image; Ray Data tasks on any CPU of the cluster hash, check, read "
            "and decode, and each worker trains on its shard (millions of images; local paths must be "
            "readable from every node)"
        ),
    )
    ingest_cache: str = setting(
        "auto",
        group="Cluster",
        help=(
            "ingest: ray_data: decode once and keep the decoded images in Ray's object store (true), decode "
            "anew each epoch (false), or auto = keep them when they fit a quarter of the object store"
        ),
    )
    num_workers: int = setting(
        1, group="Cluster", help="Ray Train workers, one per node; 0 = one per GPU node (1 without GPUs)"
    )
    use_gpu: bool = setting(False, group="Cluster", help="Train on GPUs (the cluster needs GPU nodes)")
    gpus_per_worker: int = setting(
        1,
        group="Cluster",
        help="GPUs per worker; set it to the GPUs of a node, as each node runs one worker that uses them all",
    )
    cpus_per_worker: int = setting(1, group="Cluster", help="Ray CPUs reserved per worker")
    mixed_precision: str = setting(
        "auto",
        group="Cluster",
        help=(
            "float16 compute with float32 weights and probabilities (Keras mixed_float16, loss scaling): "
            "auto = on when training on GPUs; true; false. The artifact is float32 either way"
        ),
    )
    max_failures: int = setting(
        2,
        group="Cluster",
        help="Worker failures a run survives, each by restarting the workers from the last checkpoint",
    )
    name: str = setting(
        "",
        group="Outputs",
        help=(
            'Run name; "" = train-<timestamp>. An existing name is an error unless --resume is given, '
            "which continues that run"
        ),
    )
    storage_path: str = setting(
        "runs",
        group="Outputs",
        help=(
            "Ray Train run storage (checkpoints, split manifest, logs); a shared filesystem or s3:// on "
            "multi-node clusters"
        ),
    )
    output: str = setting(
        "", group="Outputs", help='Model artifact URI (local directory or s3://); "" = <storage_path>/<name>/model'
    )
    int8: bool = setting(
        True,
        group="Outputs",
        help=(
            "Also store a full-integer (int8) LiteRT export, calibrated on 200 training images and measured "
            "on the validation split; scoring's runtime auto uses it on CPU when its quality holds"
        ),
    )
    storage: StorageConfig = setting(
        StorageConfig(), group="Outputs", help="S3 connection settings for data, run storage and the artifact"
    )

    def __post_init__(self) -> None:
        # code builds configs directly too (TrainConfig(data="path")): the same forms YAML takes
        object.__setattr__(self, "data", sources_of(self.data))

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent key."""
        _validate_train(self)


def _validate_train(self: TrainConfig) -> None:
    for source in self.data:
        source.validate()
    names = [s.label() for s in self.data]
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, f"config key 'data': two sources are named {(dup or [''])[0]!r}; set name: on one of them")
    check(
        sum(s.weight for s in self.data) <= 1 + 1e-9,
        "config key 'data': the sources' weights add up to more than 1",
    )
    check(0 <= self.tile_overlap < 0.9, "config key 'tile_overlap' must be in [0, 0.9)")
    check(self.tile_above > 1, "config key 'tile_above' must be > 1")
    check(self.mask_min_pixels >= 1, "config key 'mask_min_pixels' must be >= 1")
    check(self.mask_margin >= 0, "config key 'mask_margin' must be >= 0")
    check(len(self.class_names) == 2, "config key 'class_names' must list exactly two classes")
    check(
        self.crack_class in self.class_names,
        f"config key 'crack_class' ({self.crack_class!r}) must be one of class_names {list(self.class_names)}",
    )
    check(0 < self.val_fraction < 1, "config key 'val_fraction' must be between 0 and 1")
    check(0 <= self.test_fraction < 1, "config key 'test_fraction' must be between 0 and 1")
    check(self.val_fraction + self.test_fraction < 1, "val_fraction + test_fraction must be < 1")
    check(self.image_size >= 32, "config key 'image_size' must be at least 32")
    check(
        self.alpha in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
        "config key 'alpha' must be one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4",
    )
    check(self.batch_size > 0, "config key 'batch_size' must be positive")
    check(self.head_epochs >= 0 and self.fine_tune_epochs >= 0, "epochs must be >= 0")
    check(self.head_epochs + self.fine_tune_epochs > 0, "head_epochs + fine_tune_epochs must be > 0")
    check(0 <= self.dropout < 1, "config key 'dropout' must be in [0, 1)")
    check(
        0 <= self.brightness < 1 and 0 <= self.contrast < 1,
        "config keys 'brightness' and 'contrast' must be in [0, 1)",
    )
    check(0 <= self.label_smoothing < 0.5, "config key 'label_smoothing' must be in [0, 0.5)")
    check(
        0 <= self.warmup_epochs < max(self.head_epochs, 1),
        "config key 'warmup_epochs' must be >= 0 and below head_epochs",
    )
    check(self.swa_epochs >= 0, "config key 'swa_epochs' must be >= 0 (0 = off)")
    check(0 < self.target_recall <= 1, "config key 'target_recall' must be in (0, 1]")
    check(self.num_workers >= 0, "config key 'num_workers' must be >= 0 (0 = one per GPU node)")
    check(self.lr_schedule in ("constant", "cosine"), "config key 'lr_schedule' must be constant or cosine")
    check(self.min_epochs >= 0 and self.patience >= 0, "config keys 'min_epochs' and 'patience' must be >= 0")
    check(self.ingest in ("driver", "ray_data"), "config key 'ingest' must be driver or ray_data")
    check(self.ingest_cache in ("auto", "true", "false"), "config key 'ingest_cache' must be auto, true or false")
    check(self.freeze_base in ("auto", "true", "false"), "config key 'freeze_base' must be auto, true or false")
    check(self.mixed_precision in ("auto", "true", "false"), "config key 'mixed_precision' must be auto, true or false")
    check(self.source_size >= 0, "config key 'source_size' must be >= 0 (0 = learned from the data)")
    check(self.group_size >= 1, "config key 'group_size' must be >= 1")
    check(0 <= self.bn_momentum < 1, "config key 'bn_momentum' must be in [0, 1)")
    check(bool(self.weights), "config key 'weights' must be imagenet, none, or a path/URI")
