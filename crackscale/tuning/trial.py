"""One trial: the Tune driver function that runs a distributed training with the trial's config and
relays each epoch's metrics and checkpoint to Tune (Ray's ``TuneReportCallback`` relays metrics
only; PBT and ``--resume`` need Tune to hold checkpoints). A trial that Tune restores (PBT exploit,
``--resume``) starts a fresh Train run from ``tune.get_checkpoint()`` via ``initial_checkpoint``."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from crackscale import storage
from crackscale.config.loader import from_dict, replace, to_dict
from crackscale.config.train import TrainConfig
from crackscale.training.driver import make_trainer, storage_args

log = logging.getLogger(__name__)


def _relay_class() -> type:
    from ray.train.v2.api.callback import UserCallback

    class Relay(UserCallback):
        """Runs in the Train controller: hands each rank-0 report and its checkpoint to the trial."""

        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self.queue.put((dict(metrics[0]), checkpoint))

    return Relay


def trial(config: dict[str, Any], loop_base: dict[str, Any], meta: dict[str, Any]) -> None:
    """Tune driver function: one distributed training run with this trial's config."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.util.queue import Empty, Queue

    base = from_dict(TrainConfig, loop_base["cfg"])
    cfg = replace(base, **config)
    trial_id = ray.tune.get_context().get_trial_id()
    loop = {
        **loop_base,
        "cfg": to_dict(cfg),
        "name": f"{meta['name']}/{trial_id}",
        "output": storage.join(meta["experiment"], "trial-models", trial_id),
    }
    start = ray.tune.get_checkpoint()  # set when PBT exploited a better trial, or on --resume
    if start is not None:
        loop["initial_checkpoint"] = start
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    runs = replace(base, storage_path=storage.join(meta["experiment"], "train-runs"))
    run_config = RunConfig(
        name=f"{trial_id}-{uuid.uuid4().hex[:6]}",
        **storage_args(runs),
        callbacks=[_relay_class()(queue)],
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=3),
    )
    trainer = make_trainer(cfg, loop, run_config)
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=fit, name="train-fit", daemon=True).start()
    # tune.report must run in this (the trial's) thread; fit() returns only after every callback
    while True:
        finished = done.is_set()
        try:
            metrics, checkpoint = queue.get(timeout=0.5)
        except Empty:
            if finished:
                break
            continue
        if checkpoint is not None:  # Tune copies it into the trial's own storage
            checkpoint = ray.tune.Checkpoint(path=checkpoint.path, filesystem=checkpoint.filesystem)
        ray.tune.report(metrics, checkpoint=checkpoint)
    if "error" in outcome:
        raise outcome["error"]
    if outcome["result"].error:
        raise outcome["result"].error
