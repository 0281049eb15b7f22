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
        fs, path = storage.resolve(dest, cfg)
        try:
            fs.delete_dir_contents(path, missing_dir_ok=True)  # a regenerated report replaces the old one whole
        except OSError as e:
            raise storage.StorageError(f"cannot replace the report at {dest}: {e}") from None
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
            axes[0].text(ph[0]["epoch"] - 0.45, axes[0].get_ylim()[0], " fine-tune →", va="bottom", fontsize=8)
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
    stops = "Early stop: " + "; ".join(notes) if notes else "No early stop (every planned epoch ran)"
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


# ---- scoring report ---------------------------------------------------------------------------

def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic: the largest gap between the two empirical CDFs."""
    if not len(a) or not len(b):
        return float("nan")
    grid = np.sort(np.r_[a, b])
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.max(np.abs(cdf(a) - cdf(b))))


def run_summary(output: str, run_id: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """``<output>/_runs/<run_id>.json`` written by ``crackscale score`` ({} when missing)."""
    uri = storage.join(output, "_runs", f"{run_id}.json")
    return json.loads(storage.read_text(uri, cfg)) if storage.exists(uri, cfg) else {}


def latest_run(con: Any) -> str:
    rows = con.sql("SELECT run_id FROM scores ORDER BY scored_at DESC LIMIT 1").fetchall()
    if not rows:
        raise storage.StorageError("no scores yet: nothing to report")
    return rows[0][0]


def _gallery(page: _Page, top: list[dict[str, Any]], model_uri: str, cfg: StorageConfig | None) -> str:
    """Top images with a Grad-CAM overlay (plain thumbnails when the model cannot be loaded)."""
    from PIL import Image, ImageOps

    from crackscale import gradcam, runtime

    if not top:
        return "<p>No images scored in this run.</p>"
    model, note = None, ""
    try:
        loaded = artifact.load(model_uri, cfg)
        model, size = loaded.model, int(loaded.meta["image_size"])
    except Exception as e:  # noqa: BLE001 - the gallery still shows the images
        note = f"<p class='muted'>No heatmaps: model {_e(model_uri or '(unknown)')} not loadable: {_e(e)}</p>"
    blobs: list[bytes | None] = []
    for r in top:
        try:
            blobs.append(storage.read_bytes(r["uri"], cfg))
        except storage.StorageError:
            blobs.append(None)
    cams: dict[int, np.ndarray] = {}
    if model is not None:
        sc = ScoreConfig(storage=cfg or StorageConfig())
        aa = runtime.resize_antialias(loaded.meta)
        inputs = {i: runtime.decode_image(b, top[i]["uri"], size, sc, aa)[0] for i, b in enumerate(blobs) if b}
        inputs = {i: x for i, x in inputs.items() if x is not None}
        if inputs:
            maps, _ = gradcam.heatmaps(model, np.stack(list(inputs.values())))
            cams = dict(zip(inputs, maps))
    cells = []
    for i, (r, blob) in enumerate(zip(top, blobs)):
        if blob is None:
            img = "<p class='muted'>image unavailable</p>"
        else:
            pic = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
                             .resize((224, 224), Image.BILINEAR))
            data = gradcam.overlay_png(pic, cams[i], size=200) if i in cams else _thumb(blob)
            img = page.png(f"top/{i:03d}.png", data, f"{r['uri']}")
            if i in cams and not cams[i].max() > 0:
                img += "<br><span class='muted'>empty heatmap: nothing in the image raises P(crack)</span>"
        cells.append(f'<figure class="top" data-uri="{_e(r["uri"])}" data-probability="'
                     f'{r["crack_probability"]:.6f}">{img}<figcaption>#{i + 1} p={r["crack_probability"]:.4f}'
                     f"<br>{_e(r['uri'])}</figcaption></figure>")
    return note + f"<div class='grid'>{''.join(cells)}</div>"


def scoring_report(output_uri: str, run_id: str, cfg: StorageConfig | None = None, top_n: int = 12,
                   model_uri: str = "") -> str:
    """Write ``<output>/_reports/<run_id>/index.html`` (+ PNGs) for one scoring run; returns its URI.

    Everything comes from the Parquet outputs (and the run's ``_runs/<run_id>.json`` for what the
    Parquet cannot know: listed / skipped counts, duration). Heatmaps need the model artifact:
    ``model_uri`` or the one the run summary names.
    """
    from crackscale import query

    con = query.connect(output_uri, cfg)
    if run_id == "latest":
        run_id = latest_run(con)
    s = run_summary(output_uri, run_id, cfg)
    q = lambda sql, *p: con.sql(sql, params=list(p) or None).fetchall()  # noqa: E731
    (n, ok, failed, cracks, mid, night, span), = q(
        "SELECT count(*), count(*) FILTER (WHERE error IS NULL), count(error), count(*) FILTER (WHERE crack), "
        "any_value(model_id), any_value(run_date), epoch(max(scored_at)) - epoch(min(scored_at)) "
        "FROM scores WHERE run_id = ?",
        run_id)
    if not n and not s:
        raise storage.StorageError(f"no rows and no summary for run {run_id} under {output_uri}")
    mid, night = mid or s.get("model_id", ""), night or s.get("run_date", "")
    kinds = q("SELECT split_part(error, ':', 1) AS kind, count(*) FROM scores WHERE run_id = ? AND error "
              "IS NOT NULL GROUP BY kind ORDER BY count(*) DESC, kind", run_id)
    probs = np.array([r[0] for r in q("SELECT crack_probability FROM scores WHERE run_id = ? AND error IS NULL",
                                      run_id)], dtype=float)
    thr_rows = q("SELECT any_value(threshold) FROM scores WHERE run_id = ?", run_id)
    thr = float(thr_rows[0][0]) if thr_rows and thr_rows[0][0] is not None else 0.5
    (prev_night,), = q("SELECT max(run_date) FROM scores WHERE model_id = ? AND run_date < ?", mid, night)
    prev = np.array([r[0] for r in q("SELECT crack_probability FROM scores WHERE model_id = ? AND run_date = ? "
                                     "AND error IS NULL", mid, prev_night)], dtype=float) if prev_night else np.zeros(0)
    duration = s.get("duration_s", span or 0.0)  # without a summary: first to last commit
    share = cracks / ok if ok else float("nan")
    page = _Page(f"Scoring report: run {run_id}")
    counts = [("listed", s.get("listed")), ("already scored (skipped)", s.get("already_scored")),
              ("scored", ok), ("failed", failed), ("flagged as crack", cracks)]
    ids = ["listed", "already-scored", "scored", "failed", "flagged"]
    page.add(
        f"<p>Output <code>{_e(output_uri)}</code>; model <code>{_e(s.get('model_name', ''))}</code> "
        f"(model_id <span id='model-id'>{_e(mid)}</span>), night <span id='run-date'>{_e(night)}</span>, "
        f"runtime {_e(s.get('runtime', 'n/a'))}, threshold <span id='threshold'>{thr:.4f}</span>.</p>",
        "<h2>Counts</h2><table>" + "".join(f"<tr><th class='l'>{k}</th>{_td(i, v)}</tr>"
                                           for (k, v), i in zip(counts, ids))
        + f"<tr><th class='l'>share flagged</th>{_td('flagged-share', share)}</tr>"
        + f"<tr><th class='l'>duration (s)</th>{_td('duration-s', float(duration), 1)}</tr>"
        + f"<tr><th class='l'>throughput (img/s)</th>{_td('throughput', s.get('throughput_img_s', n / span if span else None), 1)}</tr>"
        + "</table>",
        "<h3>Failures by kind</h3>" + ("<table id='failures'>" + "".join(
            f"<tr><th class='l'>{_e(k)}</th>{_td('failed-' + k.replace(' ', '-'), c)}</tr>" for k, c in kinds)
            + "</table>" if kinds else "<p>None.</p>"),
        "<h2>Crack probabilities</h2>", _histogram(page, probs, prev, thr, night, prev_night, share),
        f"<h2>Top {top_n} most likely cracks</h2><p>Heatmap: Grad-CAM on the model's last convolutional "
        "block, red = where the model sees the crack.</p>",
        _gallery(page, _top_of_run(con, run_id, top_n), model_uri or s.get("model", ""), cfg),
    )
    return page.publish(storage.join(output_uri, "_reports", run_id), cfg)


def _top_of_run(con: Any, run_id: str, n: int) -> list[dict[str, Any]]:
    return con.sql("SELECT uri, crack_probability FROM scores WHERE run_id = ? AND error IS NULL "
                   "ORDER BY crack_probability DESC, uri LIMIT ?", params=[run_id, n]).to_arrow_table().to_pylist()


def _histogram(page: _Page, probs: np.ndarray, prev: np.ndarray, thr: float, night: str, prev_night: str | None,
               share: float) -> str:
    fig, ax = _figure(8, 3.4)
    bins = np.linspace(0, 1, 21)
    compare = bool(len(prev)) and bool(len(probs))  # densities: the nights differ in size
    ax.hist(probs, bins=bins, alpha=0.6, label=f"this run ({night}, {len(probs)} images)", density=compare)
    if compare:
        ax.hist(prev, bins=bins, histtype="step", lw=2, density=True,
                label=f"previous night ({prev_night}, {len(prev)} images)")
    ax.axvline(thr, color="red", ls="--", label=f"threshold {thr:.3f}")
    ax.set(xlabel="P(crack)", ylabel="density" if compare else "images")
    ax.legend(fontsize=8)
    img = page.fig("histogram.png", fig, "histogram of crack probabilities")
    if not len(prev):
        return img + "<p id='no-previous'>No previous night scored by this model: nothing to compare.</p>"
    prev_share = float((prev >= thr).mean())
    delta, ks = share - prev_share, ks_statistic(probs, prev)
    drift = abs(delta) >= 0.05 or ks >= 0.2
    verdict = ("<p class='drift' id='drift-alert'><b>Drift:</b> the flagged share or the score distribution "
               "moved noticeably since the previous night; check the input (new site, camera, lighting) "
               "before trusting tonight's flags.</p>" if drift else "<p class='ok'>No notable drift.</p>")
    return (img + "<table><tr><th class='l'>previous night</th><td id='previous-night'>" + _e(prev_night)
            + f"</td></tr><tr><th class='l'>share flagged then</th>{_td('previous-flagged-share', prev_share)}</tr>"
            + f"<tr><th class='l'>change in share flagged</th>{_td('flagged-share-delta', delta)}</tr>"
            + f"<tr><th class='l'>mean P(crack) change</th>{_td('mean-delta', float(probs.mean() - prev.mean()) if len(probs) else None)}</tr>"
            + f"<tr><th class='l'>KS statistic (0 same, 1 disjoint)</th>{_td('ks-statistic', ks)}</tr></table>"
            + verdict)


def safely(fn: Callable[..., str], *args: Any, **kwargs: Any) -> str:
    """``fn(*args, **kwargs)``, or "" with a warning: jobs call this after their work is committed,
    so a report that cannot be written never fails a finished training or scoring run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        log.warning("%s not written: %s", fn.__name__.replace("_", " "), e)
        return ""


# ---- command line ---------------------------------------------------------------------------------

EXAMPLE = ("examples: crackscale report --run latest --output s3://bucket/scores/\n"
           "          crackscale report --run 20261124T010203Z-1a2b3c --output scores/ --top 24\n"
           "          crackscale report --artifact runs/demo/model")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--run", help="scoring run id (as in <output>/_runs/), or 'latest'")
    p.add_argument("--output", help="scores root the run wrote to (local or s3://)")
    p.add_argument("--artifact", help="model artifact: (re)build its training report instead")
    p.add_argument("--model", default="", help="model artifact for heatmaps (default: the one the run used)")
    p.add_argument("--top", type=int, default=12, help="images in the top-cracks gallery (default 12)")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    return p


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale.config import ConfigError

    cfg = StorageConfig(s3_endpoint=args.s3_endpoint or "")
    if args.artifact:
        return {"report": training_report(args.artifact, cfg)}
    if not (args.run and args.output):
        raise ConfigError("say which report: --run RUN_ID --output SCORES_ROOT, or --artifact MODEL_DIR")
    return {"report": scoring_report(args.output, args.run, cfg, top_n=args.top, model_uri=args.model)}


def add_cli(subparsers: Any, func: Callable[[argparse.Namespace], Any] | None = None) -> None:
    """Register ``crackscale report``."""
    p = subparsers.add_parser(
        "report", help="(re)build the HTML report of a scoring run or a model artifact", epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=func or cmd_report)


def main(argv: list[str] | None = None) -> int:
    """``python -m crackscale.report`` (same as ``crackscale report``)."""
    from crackscale import cli

    p = argparse.ArgumentParser(prog="crackscale report", description=__doc__.splitlines()[0], epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_arguments(p).parse_args(argv)
    cli.setup_logging()
    return cli.run_guarded(cmd_report, args)


if __name__ == "__main__":
    raise SystemExit(main())
