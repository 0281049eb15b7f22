"""Quality of a trained model on a split: metrics at a threshold, overall and source by source,
the decision threshold that keeps ``target_recall`` on every source, and the per-item scores the
reports and ``crackscale evaluate`` read."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from crackscale import model as M
from crackscale.config.train import TrainConfig


def scores(y: np.ndarray, p: np.ndarray, cfg: TrainConfig, threshold: float | None) -> dict[str, Any]:
    """Metrics at ``threshold``, or at the threshold for ``target_recall`` on (y, p) when None."""
    if not len(y):
        return {}
    thr = threshold if threshold is not None else M.threshold_for_recall(y, p, cfg.target_recall)
    return M.metrics(y, p, thr)


def threshold_for_every_source(
    y: np.ndarray, p: np.ndarray, names: list[str], cfg: TrainConfig
) -> tuple[float, dict[str, float]]:
    """``model.threshold_for_sources`` with each source's ``target_recall`` (else the config's)."""
    return M.threshold_for_sources(y, p, names, source_targets(cfg), cfg.target_recall)


def source_targets(cfg: TrainConfig) -> dict[str, float]:
    """The sources that set their own ``target_recall``."""
    return {s.label(): s.target_recall for s in cfg.data if s.target_recall}


def predictions_csv(uris: list[str], labels: list[int], probs: np.ndarray, names: list[str] | None = None) -> str:
    """Per-item test scores as CSV (``csv`` quoting, so every URI reads back as it is); ``source``
    names each item's training source."""
    names = names if names is not None else [""] * len(uris)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("uri", "label", "probability", "source"))
    w.writerows((u, int(y), repr(float(p)), n) for u, y, p, n in zip(uris, labels, probs, names))
    return buf.getvalue()
