"""The Keras callbacks of a training phase and the state they checkpoint: early stopping that
survives a restart, the per-epoch report to Ray Train with a checkpoint, weight averaging with
BatchNorm statistics refitted, and the learning-rate schedule."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from crackscale import model as M

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.npz"
AVERAGED_FILE = "averaged_{epoch}.npz"  # swa_epochs: one of the head phase's last epochs, for a resume


class ResumableEarlyStopping:
    """Keras EarlyStopping whose best/wait survive a restart from a checkpoint."""

    def __new__(cls, initial: dict[str, Any] | None, **kwargs: Any) -> Any:
        k = M.keras()

        class Impl(k.callbacks.EarlyStopping):
            def on_train_begin(self, logs: Any = None) -> None:
                super().on_train_begin(logs)
                if initial:
                    self.best = initial["best"]
                    self.wait = initial["wait"]
                    self.best_weights = self.model.get_weights()

        return Impl(**kwargs)


class Reporter:
    """Keras callback: report metrics to Ray Train every epoch, with a checkpoint from rank 0
    (and the averager's epochs so far, when weights are averaged)."""

    def __new__(cls, state: dict[str, Any], phase: str, es: Any, rank: int, averager: Any = None) -> Any:
        k = M.keras()
        import ray.train

        class Impl(k.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                logs = {key: float(v) for key, v in (logs or {}).items()}
                stopping = bool(self.model.stop_training) or epoch + 1 >= state["phase_end"]
                entry = {"epoch": epoch + 1, "phase": phase, **logs, "epoch_s": round(time.perf_counter() - self.t0, 3)}
                state["history"].append(entry)
                state["epoch"] = epoch + 1
                state["es"] = {"best": float(es.best), "wait": int(es.wait)}
                if stopping:
                    state["phase"] = "fine_tune" if phase == "head" else "done"
                # at a phase's end Keras restores the best epoch: checkpoint those weights.
                # Every rank reads the weights: under MWMS reading sync-on-read variables is a
                # collective, so a chief-only read would deadlock.
                weights = es.best_weights if (stopping and es.best_weights is not None) else None
                weights = weights if weights is not None else self.model.get_weights()
                metrics = {**entry, "training_iteration_global": epoch + 1}
                if rank != 0:
                    ray.train.report(metrics, checkpoint=None)
                    return
                with tempfile.TemporaryDirectory() as tmp:
                    save_weights(weights, os.path.join(tmp, WEIGHTS_FILE))
                    Path(tmp, STATE_FILE).write_text(json.dumps(state))
                    if averager is not None and not stopping:
                        save_averaged(averager.last, tmp)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

        return Impl()


class Averager:
    """Keras callback, stochastic weight averaging (Izmailov et al., 2018): the phase's last epoch
    ends with the mean of the weights after each of its last ``n`` epochs, then ``recompute``
    refits BatchNorm's moving statistics to them (averaged statistics do not fit the averaged
    convolutions of a network trained from scratch). ``initial``: (epoch, weights) pairs a
    resumed run carries over from its checkpoint."""

    def __new__(cls, n: int, es: Any, state: dict[str, Any], initial: list, recompute: Any) -> Any:
        k = M.keras()
        from collections import deque

        class Impl(k.callbacks.Callback):
            def on_train_begin(self, logs: Any = None) -> None:
                self.last: deque[tuple[int, list[np.ndarray]]] = deque(initial, maxlen=n)

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                self.last.append((epoch + 1, self.model.get_weights()))
                if not (self.model.stop_training or epoch + 1 >= self.params["epochs"]):
                    return
                weights = [w for _, w in self.last]
                self.model.set_weights([np.mean(ws, axis=0) for ws in zip(*weights)])
                recompute(self.model)
                state["averaged_epochs"] = [e for e, _ in self.last]
                log.info("weights averaged over epochs %s", state["averaged_epochs"])
                # EarlyStopping restores its best weights when fit ends, and this epoch's
                # checkpoint saves them: make both the averaged model
                es.best_weights = self.model.get_weights()

        return Impl()


def save_averaged(last: Any, directory: str) -> None:
    """The averager's (epoch, weights) pairs, one ``save_weights`` file per epoch."""
    for epoch, weights in last:
        save_weights(weights, os.path.join(directory, AVERAGED_FILE.format(epoch=epoch)))


def load_averaged(directory: str) -> list[tuple[int, list[np.ndarray]]]:
    epochs = sorted(int(p.stem.split("_")[1]) for p in Path(directory).glob(AVERAGED_FILE.format(epoch="*")))
    return [(e, load_weights(os.path.join(directory, AVERAGED_FILE.format(epoch=e)))) for e in epochs]


def recompute_batchnorm(mdl: Any, strategy: Any, data: Any, steps: int) -> None:
    """Reset every BatchNorm layer's moving mean and variance to their exact average over ``steps``
    training batches of ``data`` under the current weights: one forward pass in training mode per
    batch, batch t weighted 1/(t + 1) into the running mean (momentum t / (t + 1)). Runs eagerly
    so the changing momentum is read at every call."""
    k = M.keras()
    layers = [layer for layer in mdl.submodules if isinstance(layer, k.layers.BatchNormalization)]
    saved = [layer.momentum for layer in layers]
    batches = iter(data)
    try:
        for t in range(steps):
            for layer in layers:
                layer.momentum = t / (t + 1)
            x, _ = next(batches)
            strategy.run(lambda x: mdl(x, training=True), args=(x,))
    finally:
        for layer, m in zip(layers, saved):
            layer.momentum = m
    log.info("BatchNorm statistics recomputed on %d training batches", steps)


def phase_lr(lr0: float, i: int, n: int, cosine: bool, warmup: int = 0) -> float:
    """Learning rate of epoch ``i`` (0-based) of an ``n``-epoch phase: ``warmup`` epochs rising
    linearly to ``lr0``, then constant or a half-cosine decay over the epochs left."""
    if i < warmup:
        return float(lr0 * (i + 1) / (warmup + 1))
    if not cosine:
        return float(lr0)
    i, n = i - warmup, n - warmup
    return float(lr0 * 0.5 * (1 + np.cos(np.pi * min(max(i, 0), n) / n)))


def save_weights(weights: list[np.ndarray], path: str) -> None:
    """A model's ``get_weights()`` list as .npz (order = the model's weight order)."""
    np.savez(path, *weights)


def load_weights(path: str) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]
