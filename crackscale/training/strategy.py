"""Which ``tf.distribute`` strategy a worker trains under, and the tf.data fix that multi-device
strategies need."""

from __future__ import annotations

from typing import Any

from crackscale.training.tfdata import no_autotune_options


def make_strategy(world_size: int) -> tuple[Any, str]:
    """MultiWorkerMirroredStrategy across workers; inside a lone worker, MirroredStrategy over its
    GPUs, or no strategy on one device: a strategy around a single CPU replica makes every training
    step several times slower, MWMS and MirroredStrategy alike (docs/decisions.md)."""
    import tensorflow as tf

    if world_size > 1:
        _per_device_datasets_without_autotune()
        return tf.distribute.MultiWorkerMirroredStrategy(), "MultiWorkerMirroredStrategy"
    if len(tf.config.list_logical_devices("GPU")) > 1:
        _per_device_datasets_without_autotune()
        return tf.distribute.MirroredStrategy(), "MirroredStrategy"
    return tf.distribute.get_strategy(), "default (one device)"


def multi_device(strategy: Any) -> bool:
    """True under MWMS or MirroredStrategy: their input goes through a MultiDeviceIterator, and its
    pipelines run without tf.data autotuning (see tfdata.no_autotune_options)."""
    import tensorflow as tf

    return isinstance(strategy, (tf.distribute.MultiWorkerMirroredStrategy, tf.distribute.MirroredStrategy))


def _per_device_datasets_without_autotune() -> None:
    """A strategy's distributed iterator (a MultiDeviceIterator, whatever the InputOptions) builds
    one small dataset per device with default options, so each gets its own tf.data autotuning
    thread, and with it the teardown stall ``tfdata.no_autotune_options`` explains. TensorFlow has no
    option for those datasets, so this wraps its private builder (once per process) to add ours;
    ``tests/test_train.py::test_distributed_input_pipelines_run_without_tf_data_autotuning`` fails when a
    TensorFlow upgrade moves it."""
    from tensorflow.python.data.ops import multi_device_iterator_ops as mdi

    build = mdi._create_device_dataset
    if getattr(build, "crackscale_no_autotune", False):
        return

    def without_autotune(*args: Any, **kwargs: Any) -> Any:
        return build(*args, **kwargs).with_options(no_autotune_options())

    without_autotune.crackscale_no_autotune = True  # type: ignore[attr-defined]
    mdi._create_device_dataset = without_autotune
