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


def source_table(y: np.ndarray, p: np.ndarray, names: list[str], threshold: float) -> dict[str, dict[str, Any]]:
    """Per source, in order of first appearance: items, cracks, recall, false alarms (share of
    clean items called crack), precision and ROC-AUC at ``threshold``; a rate with nothing to
    count (recall of a clean-only source) is None."""
    y, p, names_ = np.asarray(y).astype(int), np.asarray(p, dtype=float), np.asarray(names)
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        sel = names_ == name
        ys, ps = y[sel], p[sel]
        called = ps >= threshold
        pos, neg = int(ys.sum()), int((1 - ys).sum())
        tp, fp = int((called & (ys == 1)).sum()), int((called & (ys == 0)).sum())
        auc = M.roc_auc(ys, ps)
        out[str(name)] = {
            "n": int(len(ys)),
            "cracks": pos,
            "clean": neg,
            "recall": tp / pos if pos else None,
            "false_alarms": fp / neg if neg else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "roc_auc": None if np.isnan(auc) else auc,
            "missed": pos - tp,
            "false_alarm_count": fp,
        }
    return out


def threshold_for_every_source(
    y: np.ndarray, p: np.ndarray, names: list[str], cfg: TrainConfig
) -> tuple[float, dict[str, float]]:
    """The highest threshold that keeps each source's recall on its own items at its target (its
    ``target_recall``, else the config's; a source without cracks sets none), and each source's own
    threshold. With one target for all, pooled recall then holds too."""
    y, p, names_ = np.asarray(y).astype(int), np.asarray(p, dtype=float), np.asarray(names)
    targets = {s.label(): s.target_recall for s in cfg.data if s.target_recall}
    own = {
        str(n): M.threshold_for_recall(y[names_ == n], p[names_ == n], targets.get(str(n), cfg.target_recall))
        for n in dict.fromkeys(names)
        if (y[names_ == n] == 1).any()
    }
    return (min(own.values()) if own else M.threshold_for_recall(y, p, cfg.target_recall)), own


def predictions_csv(uris: list[str], labels: list[int], probs: np.ndarray, names: list[str] | None = None) -> str:
    """Per-item test scores as CSV (``csv`` quoting, so every URI reads back as it is); ``source``
    names each item's training source."""
    names = names if names is not None else [""] * len(uris)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("uri", "label", "probability", "source"))
    w.writerows((u, int(y), repr(float(p)), n) for u, y, p, n in zip(uris, labels, probs, names))
    return buf.getvalue()
