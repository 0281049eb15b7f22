"""The Ray Train backend of ``crackscale.training``: ``TF_CONFIG`` for MultiWorkerMirroredStrategy.

Ray's ``TensorflowTrainer`` does the same through ``ray.train.tensorflow.TensorflowConfig``, but
that package imports TensorFlow at import time, in every process that touches the config: the
driver that builds the trainer (a Tune trial's driver function) and the Train controller actor
that unpickles it. Neither runs a TensorFlow op, and each import costs seconds of CPU at the start
of every training run and every Tune trial (docs/decisions.md). This backend sets the same
environment on the workers (one ``TF_CONFIG`` per worker, addresses in world-rank order, and
``TF_USE_LEGACY_KERAS=1`` as Ray 2.60 does) from a module that never imports TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig


def worker_address() -> str:
    """This worker's ``host:port`` for the MWMS gRPC server (a free port on its node's IP)."""
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


def set_tf_config(addresses: list[str], index: int) -> None:
    """On a worker: the cluster spec MultiWorkerMirroredStrategy reads, before TF is imported."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


class MWMSBackend(Backend):
    def on_start(self, worker_group: Any, backend_config: MWMSConfig) -> None:
        import ray

        addresses = worker_group.execute(worker_address)
        ray.get([worker_group.execute_single_async(i, set_tf_config, addresses, i) for i in range(len(worker_group))])


@dataclass
class MWMSConfig(BackendConfig):
    """``backend_config`` of the training ``DataParallelTrainer`` (stands in for TensorflowConfig)."""

    @property
    def backend_cls(self) -> type:
        return MWMSBackend
