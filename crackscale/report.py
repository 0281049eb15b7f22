"""Self-contained HTML reports (static HTML + PNG files, no network, no CDN) inspectors can look at.

``training_report(artifact)`` writes ``<artifact>/report/index.html``: learning curves of both
phases, test-split confusion matrix, ROC/PR curves with the chosen threshold, the misclassified
test images. ``scoring_report(output, run_id)`` writes ``<output>/_reports/<run_id>/index.html``:
counts, throughput, the probability histogram against the previous night, and the top-N cracks with
a Grad-CAM overlay. Both work on local paths and ``s3://`` URIs and read only what training and
scoring wrote (model.json + test_predictions.csv; the Parquet outputs + ``_runs/<run_id>.json``).
Key numbers carry stable element ids so tests (and scripts) can check them against their source.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from crackscale import artifact, storage
from crackscale.config import ScoreConfig, StorageConfig

log = logging.getLogger(__name__)

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:200px;font-size:11px;word-break:break-all}figure img{width:200px;height:200px}
.fn{border-top:4px solid #c0392b}.fp{border-top:4px solid #e67e22}.drift{background:#fdecea;padding:8px}
.ok{color:#1e8449}.muted{color:#777}img.plot{max-width:100%}"""
# Counted by the browser after load: a report whose images do not load is caught by tests
CHECK_IMAGES = """<script>window.addEventListener('load',function(){var b=0,im=document.images;
for(var i=0;i<im.length;i++){if(!im[i].complete||im[i].naturalWidth===0)b++;}
document.getElementById('broken-images').textContent=b;
document.getElementById('image-count').textContent=im.length;});</script>"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _td(id_: str, v: Any, digits: int = 4) -> str:
    return f'<td id="{_e(id_)}" data-value="{_e(v)}">{_e(_num(v, digits))}</td>'


class _Page:
    """An HTML page being built in a local folder, with its PNG files next to it."""

    def __init__(self, title: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="crackscale-report-"))
        self.title = title
        self.parts: list[str] = []

    def add(self, *parts: str) -> None:
        self.parts.extend(parts)

    def png(self, name: str, data: bytes, alt: str, cls: str = "") -> str:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f'<img src="{_e(name)}" alt="{_e(alt)}"{f" class={cls!r}" if cls else ""}>'

    def fig(self, name: str, fig: Any, alt: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return self.png(name, buf.getvalue(), alt, "plot")

    def publish(self, dest: str, cfg: StorageConfig | None) -> str:
        """Write index.html and upload the folder to ``dest``; returns the URI of index.html."""
        (self.dir / "index.html").write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(self.title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_e(self.title)}</h1>{''.join(self.parts)}"
            "<p class='muted'>Images: <span id='image-count'>?</span>, broken: "
            f"<span id='broken-images'>?</span>.</p>{CHECK_IMAGES}</body></html>")
        if not storage.is_s3(dest) and Path(dest).is_dir():
            shutil.rmtree(dest)  # a regenerated report replaces the old one whole
        storage.upload_dir(self.dir, dest, cfg)
        shutil.rmtree(self.dir, ignore_errors=True)
        index = storage.join(dest, "index.html")
        log.info("report written to %s", index)
        return index


def _figure(w: float, h: float, n: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots(1, n)


def _thumb(blob: bytes, size: int = 200) -> bytes:
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# ---- training report --------------------------------------------------------------------------

def curves(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision–recall points at every distinct score, highest first."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(ys)[last], np.cumsum(1 - ys)[last]
    pos, neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    return {"fpr": np.r_[0, fp / neg], "tpr": np.r_[0, tp / pos],
            "precision": tp / np.maximum(tp + fp, 1), "recall": tp / pos}


def _read_predictions(uri: str, cfg: StorageConfig | None) -> list[tuple[str, int, float]]:
    path = storage.join(uri, "test_predictions.csv")
    if not storage.exists(path, cfg):
        return []
    rows = csv.DictReader(io.StringIO(storage.read_text(path, cfg)))
    return [(r["uri"], int(r["label"]), float(r["probability"])) for r in rows]


def _learning_curves(page: _Page, meta: dict[str, Any]) -> str:
    hist = meta.get("history") or []
    if not hist:
        return "<p>No training history in model.json.</p>"
    conf = meta.get("config") or {}
    fig, axes = _figure(13, 3.4, 3)
    epochs = np.array([h["epoch"] for h in hist])
    notes = []
    for ax, key in zip(axes, ("loss", "accuracy", "recall")):
        ax.plot(epochs, [h.get(key, np.nan) for h in hist], "o-", label="train")
        ax.plot(epochs, [h.get(f"val_{key}", np.nan) for h in hist], "s--", label="validation")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    for i, phase in enumerate(("head", "fine_tune")):
        ph = [h for h in hist if h["phase"] == phase]
        if not ph:
            continue
        if i == 1 and len(ph) < len(hist):
            for ax in axes:
                ax.axvline(ph[0]["epoch"] - 0.5, color="gray", lw=1)
            axes[0].text(ph[0]["epoch"] - 0.45, axes[0].get_ylim()[1], " fine-tune →", va="top", fontsize=8)
        best = min(ph, key=lambda h: h.get("val_loss", np.inf))
        axes[0].plot(best["epoch"], best.get("val_loss"), "*", ms=14, color="green",
                     label="best val_loss (weights kept)" if i == 0 else None)
        planned = int(conf.get(f"{phase}_epochs", 0) or 0)
        if planned and len(ph) < planned:
            for ax in axes:
                ax.axvline(ph[-1]["epoch"], color="red", ls=":", lw=1.5)
            notes.append(f"{phase}: early stop after epoch {ph[-1]['epoch']} ({len(ph)} of {planned} epochs)")
    axes[0].legend(fontsize=8)
    img = page.fig("learning_curves.png", fig, "learning curves")
    rows = "".join(
        f'<tr data-epoch="{h["epoch"]}" data-phase="{_e(h["phase"])}"><td>{h["epoch"]}</td><td class="l">'
        f'{_e(h["phase"])}</td>' + "".join(f"<td>{_num(h.get(k))}</td>" for k in
                                           ("loss", "val_loss", "accuracy", "val_accuracy", "recall", "val_recall"))
        + "</tr>" for h in hist)
    stops = "; ".join(notes) or "no early stop (every planned epoch ran)"
    return (f"{img}<p>Gray line: head → fine-tune boundary. Red dotted: early stop. Star: the epoch "
            f"whose weights each phase kept. <span id='early-stop'>{_e(stops)}</span>.</p>"
            "<details><summary>Per-epoch values</summary><table id='history'><tr><th>epoch</th><th>phase</th>"
            "<th>loss</th><th>val_loss</th><th>accuracy</th><th>val_accuracy</th><th>recall</th>"
            f"<th>val_recall</th></tr>{rows}</table></details>")


def _test_split(page: _Page, meta: dict[str, Any], preds: list[tuple[str, int, float]]) -> str:
    test = meta.get("metrics", {}).get("after", {}).get("test", {})
    thr = float(meta.get("threshold", test.get("threshold", 0.5)))
    cm = test.get("confusion_matrix") or {}
    out = [f"<p>Decision threshold <b id='threshold'>{thr:.4f}</b> (chosen on validation for recall ≥ "
           f"{_e(meta.get('target_recall', 'n/a'))}): on the test split precision "
           f"<b id='test-precision'>{_num(test.get('precision'))}</b>, recall "
           f"<b id='test-recall'>{_num(test.get('recall'))}</b>, ROC-AUC "
           f"<b id='test-roc-auc'>{_num(test.get('roc_auc'))}</b> ({_e(test.get('n', 0))} images).</p>"]
    if cm:
        out.append("<table><tr><th></th><th>predicted no crack</th><th>predicted crack</th></tr>"
                   f"<tr><th class='l'>no crack</th>{_td('cm-tn', cm['tn'])}{_td('cm-fp', cm['fp'])}</tr>"
                   f"<tr><th class='l'>crack</th>{_td('cm-fn', cm['fn'])}{_td('cm-tp', cm['tp'])}</tr></table>")
    if not preds:
        return "".join(out) + "<p>No test_predictions.csv in the artifact: no curves.</p>"
    y = np.array([r[1] for r in preds])
    p = np.array([r[2] for r in preds])
    c = curves(y, p)
    at = p >= thr
    tpr, fpr = (at & (y == 1)).sum() / max(y.sum(), 1), (at & (y == 0)).sum() / max((y == 0).sum(), 1)
    prec = (at & (y == 1)).sum() / max(at.sum(), 1)
    fig, (a1, a2, a3) = _figure(13, 3.8, 3)
    a1.imshow([[cm.get("tn", 0), cm.get("fp", 0)], [cm.get("fn", 0), cm.get("tp", 0)]], cmap="Blues")
    for (i, j), key in {(0, 0): "tn", (0, 1): "fp", (1, 0): "fn", (1, 1): "tp"}.items():
        a1.text(j, i, f"{key.upper()}\n{cm.get(key, 0)}", ha="center", va="center", fontsize=12)
    a1.set_xticks([0, 1], ["no crack", "crack"])
    a1.set_yticks([0, 1], ["no crack", "crack"])
    a1.set_xlabel("predicted")
    a1.set_ylabel("true")
    a1.set_title("confusion matrix (test)")
    a2.plot(c["fpr"], c["tpr"])
    a2.plot([0, 1], [0, 1], ":", color="gray")
    a2.plot(fpr, tpr, "o", color="red", label=f"threshold {thr:.3f}")
    a2.set(title=f"ROC (AUC {_num(test.get('roc_auc'), 3)})", xlabel="false positive rate", ylabel="recall")
    a2.legend(loc="lower right", fontsize=8)
    a3.plot(c["recall"], c["precision"])
    a3.plot(tpr, prec, "o", color="red", label=f"threshold {thr:.3f}: P {prec:.3f}, R {tpr:.3f}")
    a3.set(title="precision–recall", xlabel="recall", ylabel="precision", ylim=(0, 1.02))
    a3.legend(loc="lower left", fontsize=8)
    out.append(page.fig("test_curves.png", fig, "confusion matrix, ROC and PR curves"))
    return "".join(out)


def _errors(page: _Page, meta: dict[str, Any], preds: list[tuple[str, int, float]], limit: int,
            cfg: StorageConfig | None) -> str:
    thr = float(meta.get("threshold", 0.5))
    fns = sorted((r for r in preds if r[1] == 1 and r[2] < thr), key=lambda r: r[2])
    fps = sorted((r for r in preds if r[1] == 0 and r[2] >= thr), key=lambda r: -r[2])
    cells = []
    for k, (uri, label, p) in enumerate((fns + fps)[:limit]):
        kind = "fn" if label == 1 else "fp"
        try:
            img = page.png(f"errors/{k:03d}.png", _thumb(storage.read_bytes(uri, cfg)), f"{kind} {uri}")
        except Exception as e:  # noqa: BLE001 - an unreadable image must not sink the report
            img = f"<p class='muted'>image unavailable: {_e(str(e).splitlines()[0][:120])}</p>"
        cells.append(f'<figure class="{kind}" data-uri="{_e(uri)}" data-probability="{p:.6f}">{img}'
                     f"<figcaption><b>{'missed crack' if kind == 'fn' else 'false alarm'}</b> "
                     f"p={p:.4f}<br>{_e(uri)}</figcaption></figure>")
    shown = f" (first {limit} shown)" if len(fns) + len(fps) > limit else ""
    return (f"<p><span id='n-false-negatives'>{len(fns)}</span> missed cracks (false negatives, first, "
            f"lowest score first) and <span id='n-false-positives'>{len(fps)}</span> false alarms{shown}."
            f"</p><div class='grid'>{''.join(cells)}</div>")


def training_report(artifact_uri: str, cfg: StorageConfig | None = None, max_errors: int = 24) -> str:
    """Write ``<artifact>/report/index.html`` (+ PNGs) for a model artifact; returns its URI."""
    meta = artifact.read_meta(artifact_uri, cfg)
    preds = _read_predictions(artifact_uri, cfg)
    page = _Page(f"Training report: {meta.get('name', artifact_uri)}")
    m = meta.get("metrics", {})
    rows = []
    for key in ("accuracy", "precision", "recall", "roc_auc", "threshold", "loss"):
        cells = "".join(_td(f"{w}-{s}-{key.replace('_', '-')}", m.get(w, {}).get(s, {}).get(key))
                        for w in ("before", "after") for s in ("val", "test"))
        rows.append(f"<tr><th class='l'>{key}</th>{cells}</tr>")
    stats = meta.get("data_stats") or {}
    split = stats.get("per_split", {})
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
    tb = storage.exists(storage.join(artifact_uri, "tensorboard"), cfg)
    page.add(
        f"<p>Artifact <code>{_e(artifact_uri)}</code>, created {_e(meta.get('created_at', 'n/a'))}, "
        f"{_e(meta.get('num_workers', '?'))} worker(s); {_e(versions)}. Epochs run: "
        f"<span id='epochs-run'>{len(meta.get('history') or [])}</span>. Images per split: "
        + ", ".join(f"{_e(s)} {sum(v.values())}" for s, v in split.items()) + ".</p>",
        "<h2>Metrics</h2><table><tr><th></th><th>before: val</th><th>before: test</th><th>after: val</th>"
        f"<th>after: test</th></tr>{''.join(rows)}</table><p class='muted'>Before: the initial model "
        "at threshold 0.5. After: the trained model at the chosen threshold.</p>",
        "<h2>Learning curves</h2>", _learning_curves(page, meta),
        "<h2>Test split</h2>", _test_split(page, meta, preds),
        "<h2>Test images the model got wrong</h2>", _errors(page, meta, preds, max_errors, cfg),
        "<h2>TensorBoard</h2>" + (
            f"<p>Logs: <a href='../tensorboard/'>tensorboard/</a>; view with <code>tensorboard --logdir "
            f"{_e(storage.join(artifact_uri, 'tensorboard'))}</code></p>" if tb else "<p>No TensorBoard logs.</p>"),
    )
    return page.publish(storage.join(artifact_uri, "report"), cfg)
