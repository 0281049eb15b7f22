"""``training_report(artifact)`` writes ``<artifact>/report/index.html``: learning curves of both
phases, the test split's confusion matrix, ROC/PR curves with the chosen threshold, and the
misclassified test images. It reads model.json and test_predictions.csv only."""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import numpy as np

from crackscale import artifact, storage
from crackscale.config.storage import StorageConfig
from crackscale.reports.items import error_grid, source_table
from crackscale.reports.page import Page, esc, figure, num, td

log = logging.getLogger(__name__)


def curves(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision–recall points at every distinct score, highest first."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(ys)[last], np.cumsum(1 - ys)[last]
    pos, neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    return {
        "fpr": np.r_[0, fp / neg],
        "tpr": np.r_[0, tp / pos],
        "precision": tp / np.maximum(tp + fp, 1),
        "recall": tp / pos,
    }


def _read_predictions(uri: str, cfg: StorageConfig | None) -> list[tuple[str, int, float]]:
    path = storage.join(uri, "test_predictions.csv")
    if not storage.exists(path, cfg):
        return []
    rows = csv.DictReader(io.StringIO(storage.read_text(path, cfg)))
    return [(r["uri"], int(r["label"]), float(r["probability"])) for r in rows]


def _learning_curves(page: Page, meta: dict[str, Any]) -> str:
    hist = meta.get("history") or []
    if not hist:
        return "<p>No training history in model.json.</p>"
    conf = meta.get("config") or {}
    fig, axes = figure(13, 3.4, 3)
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
            axes[0].text(ph[0]["epoch"] - 0.45, axes[0].get_ylim()[0], " fine-tune →", va="bottom", fontsize=8)
        best = min(ph, key=lambda h: h.get("val_loss", np.inf))
        axes[0].plot(
            best["epoch"],
            best.get("val_loss"),
            "*",
            ms=14,
            color="green",
            label="best val_loss (weights kept)" if i == 0 else None,
        )
        planned = int(conf.get(f"{phase}_epochs", 0) or 0)
        if planned and len(ph) < planned:
            for ax in axes:
                ax.axvline(ph[-1]["epoch"], color="red", ls=":", lw=1.5)
            notes.append(f"{phase}: early stop after epoch {ph[-1]['epoch']} ({len(ph)} of {planned} epochs)")
    axes[0].legend(fontsize=8)
    img = page.fig("learning_curves.png", fig, "learning curves")
    rows = "".join(
        f'<tr data-epoch="{esc(h["epoch"])}" data-phase="{esc(h["phase"])}"><td>{esc(h["epoch"])}</td><td class="l">'
        f"{esc(h['phase'])}</td>"
        + "".join(
            f"<td>{esc(num(h.get(k)))}</td>"
            for k in ("loss", "val_loss", "accuracy", "val_accuracy", "recall", "val_recall")
        )
        + "</tr>"
        for h in hist
    )
    stops = "Early stop: " + "; ".join(notes) if notes else "No early stop (every planned epoch ran)"
    return (
        f"{img}<p>Gray line: head → fine-tune boundary. Red dotted: early stop. Star: the epoch "
        f"whose weights each phase kept. <span id='early-stop'>{esc(stops)}</span>.</p>"
        "<details><summary>Per-epoch values</summary><table id='history'><tr><th>epoch</th><th>phase</th>"
        "<th>loss</th><th>val_loss</th><th>accuracy</th><th>val_accuracy</th><th>recall</th>"
        f"<th>val_recall</th></tr>{rows}</table></details>"
    )


def _test_split(page: Page, meta: dict[str, Any], preds: list[tuple[str, int, float]]) -> str:
    test = meta.get("metrics", {}).get("after", {}).get("test", {})
    thr = float(meta.get("threshold", test.get("threshold", 0.5)))
    cm = test.get("confusion_matrix") or {}
    out = [
        f"<p>Decision threshold <b id='threshold'>{thr:.4f}</b> (chosen on validation for recall ≥ "
        f"{esc(meta.get('target_recall', 'n/a'))}): on the test split precision "
        f"<b id='test-precision'>{num(test.get('precision'))}</b>, recall "
        f"<b id='test-recall'>{num(test.get('recall'))}</b>, ROC-AUC "
        f"<b id='test-roc-auc'>{num(test.get('roc_auc'))}</b> ({esc(test.get('n', 0))} images).</p>"
    ]
    if cm:
        out.append(
            "<table><tr><th></th><th>predicted no crack</th><th>predicted crack</th></tr>"
            f"<tr><th class='l'>no crack</th>{td('cm-tn', cm['tn'])}{td('cm-fp', cm['fp'])}</tr>"
            f"<tr><th class='l'>crack</th>{td('cm-fn', cm['fn'])}{td('cm-tp', cm['tp'])}</tr></table>"
        )
    if not preds:
        return "".join(out) + "<p>No test_predictions.csv in the artifact: no curves.</p>"
    y = np.array([r[1] for r in preds])
    p = np.array([r[2] for r in preds])
    c = curves(y, p)
    at = p >= thr
    tpr, fpr = (at & (y == 1)).sum() / max(y.sum(), 1), (at & (y == 0)).sum() / max((y == 0).sum(), 1)
    prec = (at & (y == 1)).sum() / max(at.sum(), 1)
    fig, (a1, a2, a3) = figure(13, 3.8, 3)
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
    a2.set(title=f"ROC (AUC {num(test.get('roc_auc'), 3)})", xlabel="false positive rate", ylabel="recall")
    a2.legend(loc="lower right", fontsize=8)
    a3.plot(c["recall"], c["precision"])
    a3.plot(tpr, prec, "o", color="red", label=f"threshold {thr:.3f}: P {prec:.3f}, R {tpr:.3f}")
    a3.set(title="precision–recall", xlabel="recall", ylabel="precision", ylim=(0, 1.02))
    a3.legend(loc="lower left", fontsize=8)
    out.append(page.fig("test_curves.png", fig, "confusion matrix, ROC and PR curves"))
    return "".join(out)


def _errors(
    page: Page, meta: dict[str, Any], preds: list[tuple[str, int, float]], limit: int, cfg: StorageConfig | None
) -> str:
    items = [{"uri": u, "label": y, "probability": p} for u, y, p in preds]
    return error_grid(page, items, float(meta.get("threshold", 0.5)), limit, cfg, "errors", one_per_page=True)


def _exports(meta: dict[str, Any]) -> str:
    """The fp32 export's parity and the int8 export's validation quality beside tf.keras's."""
    lit = meta.get("litert") or {}
    fp32 = (
        f"<p>fp32 <code>model.tflite</code>: max |Δp| against tf.keras "
        f"<span id='fp32-parity'>{num(lit.get('parity_max_abs_diff'))}</span> on {esc(lit.get('parity_images', 0))} "
        f"{esc(lit.get('parity_on', 'images'))}.</p>"
        if lit.get("sha256")
        else f"<p>No fp32 LiteRT export ({esc(lit.get('error', 'not stored'))}).</p>"
    )
    rec = meta.get("litert_int8") or {}
    if not rec.get("sha256"):
        return fp32 + f"<p id='int8'>No int8 export ({esc(rec.get('error', 'not stored'))}).</p>"
    chosen, why = artifact.int8_qualifies(meta)
    v, f = rec["val"], rec["fp32_val"]
    rows = "".join(
        f"<tr><th class='l'>{k}</th>{td(f'int8-{k}', v.get(k))}{td(f'fp32-{k}', f.get(k))}</tr>"
        for k in ("accuracy", "recall", "precision", "roc_auc")
    )
    return (
        fp32 + f"<table><tr><th>validation ({esc(v.get('n'))} images)</th><th>int8</th><th>tf.keras</th></tr>{rows}"
        f"<tr><th class='l'>threshold</th>{td('int8-threshold', rec.get('threshold'))}"
        f"{td('fp32-threshold', meta.get('threshold'))}</tr></table>"
        f"<p>Same decision on {num(rec.get('agreement'))} of the images, max |Δp| {num(rec.get('max_abs_diff'))}. "
        f"<span id='int8-chosen' data-value='{str(chosen).lower()}'>runtime auto "
        f"{'scores with the int8 model' if chosen else 'keeps fp32'}</span>: {esc(why)}.</p>"
    )


def _sources(meta: dict[str, Any]) -> str:
    """What each training source gave (items per split and class, tiles left out) and its test
    split's quality at the artifact's threshold."""
    stats = (meta.get("data_stats") or {}).get("sources") or {}
    per_source = ((meta.get("metrics") or {}).get("after") or {}).get("per_source") or {}
    if not stats:
        return ""
    rows = []
    for name, st in stats.items():
        split = st.get("per_split", {})
        counts = " · ".join(f"{s} " + "/".join(str(v) for v in split.get(s, {}).values()) for s in split)
        extra = f", {st['photos']} photos, {st['tiles_left_out']} tiles left out" if "photos" in st else ""
        rows.append(
            f"<tr><td class='l'>{esc(name)}</td><td class='l'>{esc(st.get('kind', ''))}{esc(extra)}</td>"
            f"<td class='l'>{esc(counts)}</td></tr>"
        )
    classes = "/".join(meta.get("class_names") or [])
    out = [
        "<h2>Sources</h2>",
        f"<table><tr><th class='l'>source</th><th class='l'>kind</th><th class='l'>items per split ({esc(classes)})"
        f"</th></tr>{''.join(rows)}</table>",
    ]
    if per_source.get("test"):
        own = (meta.get("metrics") or {}).get("after", {}).get("threshold_by_source") or {}
        out += [
            "<h3>Test split, source by source</h3>",
            source_table(per_source["test"], "test"),
            "<p class='muted'>At the artifact's threshold, the highest that keeps each source's target recall on "
            "its own validation items (each source's own: "
            + ", ".join(f"{esc(k)} {v:.4f}" for k, v in own.items())
            + "). False alarms: the share of clean items called crack.</p>",
        ]
    return "".join(out)


def training_report(artifact_uri: str, cfg: StorageConfig | None = None, max_errors: int = 24) -> str:
    """Write ``<artifact>/report/index.html`` (+ PNGs) for a model artifact; returns its URI."""
    meta = artifact.read_meta(artifact_uri, cfg)
    preds = _read_predictions(artifact_uri, cfg)
    page = Page(f"Training report: {meta.get('name', artifact_uri)}")
    m = meta.get("metrics", {})
    rows = []
    for key in ("accuracy", "precision", "recall", "roc_auc", "threshold", "loss"):
        cells = "".join(
            td(f"{w}-{s}-{key.replace('_', '-')}", m.get(w, {}).get(s, {}).get(key))
            for w in ("before", "after")
            for s in ("val", "test")
        )
        rows.append(f"<tr><th class='l'>{key}</th>{cells}</tr>")
    stats = meta.get("data_stats") or {}
    split = stats.get("per_split", {})
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
    tb = storage.exists(storage.join(artifact_uri, "tensorboard"), cfg)
    page.add(
        f"<p>Artifact <code>{esc(artifact_uri)}</code>, created {esc(meta.get('created_at', 'n/a'))}, "
        f"{esc(meta.get('num_workers', '?'))} worker(s); {esc(versions)}. Epochs run: "
        f"<span id='epochs-run'>{len(meta.get('history') or [])}</span>. Images per split: "
        + ", ".join(f"{esc(s)} {sum(v.values())}" for s, v in split.items())
        + ".</p>",
        "<h2>Metrics</h2><table><tr><th></th><th>before: val</th><th>before: test</th><th>after: val</th>"
        f"<th>after: test</th></tr>{''.join(rows)}</table><p class='muted'>Before: the initial model "
        "at threshold 0.5. After: the trained model at the chosen threshold.</p>",
        _sources(meta),
        "<h2>Learning curves</h2>",
        _learning_curves(page, meta),
        "<h2>Test split</h2>",
        _test_split(page, meta, preds),
        "<h2>Test images the model got wrong</h2>",
        _errors(page, meta, preds, max_errors, cfg),
        "<h2>LiteRT exports</h2>",
        _exports(meta),
        "<h2>TensorBoard</h2>"
        + (
            f"<p>Logs: <a href='../tensorboard/'>tensorboard/</a>; view with <code>tensorboard --logdir "
            f"{esc(storage.join(artifact_uri, 'tensorboard'))}</code></p>"
            if tb
            else "<p>No TensorBoard logs.</p>"
        ),
    )
    return page.publish(storage.join(artifact_uri, "report"), cfg)
