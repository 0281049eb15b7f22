"""``scoring_report(output, run_id)`` writes ``<output>/_reports/<run_id>/index.html``: counts,
throughput, the probability histogram against the previous night, and the top-N cracks with a
Grad-CAM overlay; for whole photos a crack map each (``reports.photos``), a summary per site and a
review queue. It reads the Parquet outputs and the run's ``_runs/<run_id>.json``."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from crackscale import artifact, query, storage
from crackscale.config.score import ScoreConfig
from crackscale.config.storage import StorageConfig
from crackscale.imaging.tfdecode import resize_antialias
from crackscale.reports import gradcam, photos
from crackscale.reports.page import Page, esc, figure, td, thumb
from crackscale.runtimes.litert import LiteRTHeatmaps
from crackscale.scoring.decode import decode_image

log = logging.getLogger(__name__)


# model URI → the artifact loaded ahead of the report, in a ReportProcess
_WARM: dict[str, artifact.Loaded] = {}


class ReportProcess:
    """A scoring run's report, built in a process of its own that starts with the run: while the
    run scores, it imports TensorFlow and matplotlib and loads the model for the Grad-CAM heatmaps
    (on the CPU), so after the last commit only the report itself is left to do. ``crackscale
    score`` uses it for artifacts without a heatmap export only (``crackscale export --heatmap``
    adds one; with it the report needs no TensorFlow and is built in the job's process). Holds the model in
    memory for the run's duration; ``close`` ends it whatever happened. A plain subprocess (not
    multiprocessing): it never re-runs the caller's main module."""

    def __init__(self, model_uri: str, cfg: StorageConfig | None = None) -> None:
        import os
        import subprocess
        import sys

        import crackscale
        from crackscale.config.loader import to_dict

        # the same crackscale as this process (a job's working-dir copy, say), heatmaps on the CPU
        here = str(Path(crackscale.__file__).resolve().parent.parent)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        code = "import sys; from crackscale.reports.scoring import _serve; _serve(sys.argv[1], sys.argv[2])"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, model_uri, json.dumps(to_dict(cfg or StorageConfig()))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def build(self, output_uri: str, run_id: str, timeout_s: float = 600.0) -> str:
        """The report of ``run_id`` (its URI), or "" with a warning if it could not be written:
        a report never fails a finished run."""
        import subprocess

        try:
            out, _ = self._proc.communicate(json.dumps({"output": output_uri, "run_id": run_id}) + "\n", timeout_s)
            lines = out.strip().splitlines()
            ended = {"error": f"the report process exited ({self._proc.returncode})"}
            answer = json.loads(lines[-1]) if lines else ended
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            answer = {"error": f"the report process failed: {e}"}
        if "report" not in answer:
            log.warning("scoring report not written: %s", answer.get("error"))
            return ""
        return answer["report"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()  # no report asked for (the run failed): nothing of value is lost
        self._proc.wait()
        for f in (self._proc.stdin, self._proc.stdout):
            if f and not f.closed:
                f.close()

    def __enter__(self) -> ReportProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def import_ahead() -> None:
    """Import the report's libraries (plotting, SQL over Parquet) on a daemon thread while the
    run scores: the report then starts at once after the last commit."""
    import threading

    def imports() -> None:
        import duckdb  # noqa: F401
        import matplotlib.backends.backend_agg  # noqa: F401 - what a figure's savefig draws with
        import matplotlib.figure  # noqa: F401

    threading.Thread(target=imports, name="report-imports", daemon=True).start()


def _serve(model_uri: str, storage_json: str) -> None:
    """The report process: warm up, then build the one report its stdin asks for (a JSON line with
    ``output`` and ``run_id``; nothing: none) and answer on stdout (``report`` or ``error``)."""
    import sys

    from crackscale.config.loader import from_dict

    cfg = from_dict(StorageConfig, json.loads(storage_json))
    try:
        import matplotlib.pyplot  # noqa: F401 - the histogram's import, ahead of time

        if has_heatmap_export(model_uri, cfg):
            raise RuntimeError("its heatmaps come from its LiteRT export")
        loaded = _WARM[model_uri] = artifact.load(model_uri, cfg)
        size = int(loaded.meta["image_size"])
        gradcam.heatmaps(loaded.model, np.zeros((1, size, size, 3), np.float32))  # its first call traces
    except Exception as e:  # noqa: BLE001 - the report notes the missing heatmaps itself
        log.info("report process: model not loaded ahead (%s)", e)
    line = sys.stdin.readline()
    if not line.strip():
        return
    job = json.loads(line)
    try:
        answer = {"report": scoring_report(job["output"], job["run_id"], cfg)}
    except Exception as e:  # noqa: BLE001
        answer = {"error": str(e)}
    print(json.dumps(answer), flush=True)


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


def has_heatmap_export(model_uri: str, cfg: StorageConfig | None = None) -> bool:
    """Whether the artifact's heatmaps come from its LiteRT export: its report needs no TensorFlow."""
    try:
        return bool((artifact.read_meta(model_uri, cfg).get("heatmap") or {}).get("sha256"))
    except (OSError, artifact.ArtifactError, storage.StorageError):
        return False


def _heatmaps(model_uri: str, cfg: StorageConfig | None) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """Grad-CAM maps (0..1) for a batch of images of the artifact's input size, and its model.json:
    from its heatmap export on LiteRT when it has one, else from the Keras model with TensorFlow."""
    meta = artifact.read_meta(model_uri, cfg)
    if (meta.get("heatmap") or {}).get("sha256"):
        return LiteRTHeatmaps(artifact.read_litert(model_uri, meta, cfg, key="heatmap")).maps, meta
    loaded = _WARM.get(model_uri) or artifact.load(model_uri, cfg)
    return lambda x: gradcam.heatmaps(loaded.model, x)[0], loaded.meta


def _tile_view(
    blob: bytes, box: tuple[int, int, int, int], size: int, antialias: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(the model's input, the picture at 224 px) of one tile of a photo, cut as scoring cut it."""
    from crackscale.imaging import photo

    x, y, w, h = box
    tile = photo.decode_file(blob)[y : y + h, x : x + w]
    return photo.resize(tile, size, antialias), photo.resize(tile, 224, antialias)


def _gallery(page: Page, top: list[dict[str, Any]], model_uri: str, cfg: StorageConfig | None) -> str:
    """Top images with a Grad-CAM overlay (plain thumbnails when the model cannot be loaded). A photo
    scored as tiles shows its highest tile (``top_tile``), the heatmap drawn on it."""
    from PIL import Image, ImageOps

    if not top:
        return "<p>No images scored in this run.</p>"
    maps_of, meta, note = None, {}, ""
    try:
        maps_of, meta = _heatmaps(model_uri, cfg)
    except Exception as e:  # noqa: BLE001 - the gallery still shows the images
        note = f"<p class='muted'>No heatmaps: model {esc(model_uri or '(unknown)')} not loadable: {esc(e)}</p>"
    blobs: list[bytes | None] = []
    for r in top:
        try:
            blobs.append(storage.read_bytes(r["uri"], cfg))
        except storage.StorageError:
            blobs.append(None)
    cams: dict[int, np.ndarray] = {}
    views: dict[int, np.ndarray] = {}  # tiles: the picture the heatmap is drawn on
    if maps_of is not None:
        sc = ScoreConfig(storage=cfg or StorageConfig())
        size, aa = int(meta["image_size"]), resize_antialias(meta)
        inputs = {}
        for i, b in enumerate(blobs):
            if not b:
                continue
            if top[i].get("top_tile"):
                try:
                    inputs[i], views[i] = _tile_view(b, top[i]["top_tile"][:4], size, aa)
                except (ValueError, OSError):  # a photo that no longer decodes: shown without a heatmap
                    continue
            else:
                inputs[i] = decode_image(b, top[i]["uri"], size, sc, aa)[0]
        inputs = {i: x for i, x in inputs.items() if x is not None}
        if inputs:
            cams = dict(zip(inputs, maps_of(np.stack(list(inputs.values())))))
    cells = []
    for i, (r, blob) in enumerate(zip(top, blobs)):
        if blob is None:
            img = "<p class='muted'>image unavailable</p>"
        else:
            pic = views.get(i)
            if pic is None:
                pic = np.asarray(
                    ImageOps.exif_transpose(Image.open(io.BytesIO(blob)))
                    .convert("RGB")
                    .resize((224, 224), Image.BILINEAR)
                )
            data = gradcam.overlay_png(pic, cams[i], size=200) if i in cams else thumb(blob)
            img = page.png(f"top/{i:03d}.png", data, f"{r['uri']}")
            if i in cams and not cams[i].max() > 0:
                img += "<br><span class='muted'>empty heatmap: nothing in the image raises P(crack)</span>"
        where = ""
        if r.get("top_tile"):
            x, y, w, h, row, col = r["top_tile"]
            where = f"<br>highest of {r['tiles']} tiles: row {row}, col {col} (x {x}, y {y}, {w}×{h})"
        cells.append(
            f'<figure class="top" data-uri="{esc(r["uri"])}" data-probability="'
            f'{r["crack_probability"]:.6f}">{img}<figcaption>#{i + 1} p={r["crack_probability"]:.4f}'
            f"{where}<br>{esc(r['uri'])}</figcaption></figure>"
        )
    return note + f"<div class='grid'>{''.join(cells)}</div>"


def scoring_report(
    output_uri: str,
    run_id: str,
    cfg: StorageConfig | None = None,
    top_n: int = 12,
    model_uri: str = "",
    max_maps: int = 100,
    review_n: int = 20,
) -> str:
    """Write ``<output>/_reports/<run_id>/index.html`` (+ PNGs) for one scoring run; returns its URI.

    Everything comes from the Parquet outputs (and the run's ``_runs/<run_id>.json`` for what the
    Parquet cannot know: listed / skipped counts, duration). Heatmaps need the model artifact:
    ``model_uri`` or the one the run summary names.
    """
    con = query.connect(output_uri, cfg, all_versions=True)  # the run's own rows, even if scored again since
    if run_id == "latest":
        run_id = latest_run(con)
    s = run_summary(output_uri, run_id, cfg)
    q = lambda sql, *p: con.sql(sql, params=list(p) or None).fetchall()  # noqa: E731
    ((n, ok, failed, cracks, mid, night, span),) = q(
        "SELECT count(*), count(*) FILTER (WHERE error IS NULL), count(error), count(*) FILTER (WHERE crack), "
        "any_value(model_id), any_value(run_date), epoch(max(scored_at)) - epoch(min(scored_at)) "
        "FROM scores WHERE run_id = ?",
        run_id,
    )
    if not n and not s:
        raise storage.StorageError(f"no rows and no summary for run {run_id} under {output_uri}")
    mid, night = mid or s.get("model_id", ""), night or s.get("run_date", "")
    kinds = q(
        "SELECT split_part(error, ':', 1) AS kind, count(*) FROM scores WHERE run_id = ? AND error "
        "IS NOT NULL GROUP BY kind ORDER BY count(*) DESC, kind",
        run_id,
    )
    probs = np.array(
        [r[0] for r in q("SELECT crack_probability FROM scores WHERE run_id = ? AND error IS NULL", run_id)],
        dtype=float,
    )
    thr_rows = q("SELECT any_value(threshold) FROM scores WHERE run_id = ?", run_id)
    thr = float(thr_rows[0][0]) if thr_rows and thr_rows[0][0] is not None else 0.5
    ((prev_night,),) = q("SELECT max(run_date) FROM scores WHERE model_id = ? AND run_date < ?", mid, night)
    prev = (
        np.array(
            [
                r[0]
                for r in q(
                    "SELECT crack_probability FROM scores WHERE model_id = ? AND run_date = ? AND error IS NULL",
                    mid,
                    prev_night,
                )
            ],
            dtype=float,
        )
        if prev_night
        else np.zeros(0)
    )
    duration = s.get("duration_s", span or 0.0)  # without a summary: first to last commit
    share = cracks / ok if ok else float("nan")
    throughput = s.get("throughput_img_s", n / span if span else None)
    ((n_tiles,),) = q("SELECT sum(tiles) FROM scores WHERE run_id = ? AND error IS NULL", run_id)
    n_tiles = int(n_tiles or 0)
    tile_rate = n_tiles / float(duration) if duration else None
    page = Page(f"Scoring report: run {run_id}")
    counts = [
        ("listed", s.get("listed")),
        ("already scored (skipped)", s.get("already_scored")),
        ("scored", ok),
        ("failed", failed),
        ("flagged as crack", cracks),
        ("tiles scored (an image scored whole is one)", n_tiles),
    ]
    ids = ["listed", "already-scored", "scored", "failed", "flagged", "tiles"]
    page.add(
        f"<p>Output <code>{esc(output_uri)}</code>; model <code>{esc(s.get('model_name', ''))}</code> "
        f"(model_id <span id='model-id'>{esc(mid)}</span>), night <span id='run-date'>{esc(night)}</span>, "
        f"runtime {esc(s.get('runtime', 'n/a'))}, threshold <span id='threshold'>{thr:.4f}</span>.</p>",
        "<h2>Counts</h2><table>"
        + "".join(f"<tr><th class='l'>{k}</th>{td(i, v)}</tr>" for (k, v), i in zip(counts, ids))
        + f"<tr><th class='l'>share flagged</th>{td('flagged-share', share)}</tr>"
        + f"<tr><th class='l'>duration (s)</th>{td('duration-s', float(duration), 1)}</tr>"
        + f"<tr><th class='l'>throughput (img/s)</th>{td('throughput', throughput, 1)}</tr>"
        + f"<tr><th class='l'>throughput (tiles/s)</th>{td('tile-throughput', tile_rate, 1)}</tr>"
        + "</table>",
        "<h3>Failures by kind</h3>"
        + (
            "<table id='failures'>"
            + "".join(f"<tr><th class='l'>{esc(k)}</th>{td('failed-' + k.replace(' ', '-'), c)}</tr>" for k, c in kinds)
            + "</table>"
            if kinds
            else "<p>None.</p>"
        ),
        "<h2>Crack probabilities</h2>",
        _histogram(page, probs, prev, thr, night, prev_night, share),
        f"<h2>Top {top_n} most likely cracks</h2><p>Heatmap: Grad-CAM on the model's last convolutional "
        "block, red = where the model sees the crack.</p>",
        _gallery(page, _top_of_run(con, run_id, top_n), model_uri or s.get("model", ""), cfg),
        "<h2>Photos with cracks</h2><p>Each photo scored as tiles: its tiles' P(crack) as heat (brighter = "
        "higher), the tiles at or above the threshold outlined.</p>",
        photos.photo_gallery(page, con, run_id, thr, cfg, max_maps),
        "<h2>Sites</h2><p>Per folder of the input.</p>",
        photos.sites(con, run_id),
        f"<h2>Review queue</h2><p>The {review_n} images closest to the threshold: the least sure calls, for a "
        "person to check.</p>",
        photos.review_queue(con, run_id, thr, review_n),
    )
    return page.publish(storage.join(output_uri, "_reports", run_id), cfg)


def _top_of_run(con: Any, run_id: str, n: int) -> list[dict[str, Any]]:
    """The run's ``n`` highest rows; a photo scored as tiles with its highest tile (x, y, w, h, row, col)."""
    top = (
        con.sql(
            "SELECT uri, crack_probability, tiles FROM scores WHERE run_id = ? AND error IS NULL "
            "ORDER BY crack_probability DESC, uri LIMIT ?",
            params=[run_id, n],
        )
        .to_arrow_table()
        .to_pylist()
    )
    for r in top:
        if (r.get("tiles") or 0) > 1:
            best = con.sql(
                "SELECT x, y, w, h, row, col FROM tiles WHERE run_id = ? AND uri = ? "
                "ORDER BY probability DESC, row, col LIMIT 1",
                params=[run_id, r["uri"]],
            ).fetchall()
            r["top_tile"] = tuple(best[0]) if best else None
    return top


def _histogram(
    page: Page, probs: np.ndarray, prev: np.ndarray, thr: float, night: str, prev_night: str | None, share: float
) -> str:
    fig, ax = figure(8, 3.4)
    bins = np.linspace(0, 1, 21)
    compare = bool(len(prev)) and bool(len(probs))  # densities: the nights differ in size
    ax.hist(probs, bins=bins, alpha=0.6, label=f"this run ({night}, {len(probs)} images)", density=compare)
    if compare:
        ax.hist(
            prev,
            bins=bins,
            histtype="step",
            lw=2,
            density=True,
            label=f"previous night ({prev_night}, {len(prev)} images)",
        )
    ax.axvline(thr, color="red", ls="--", label=f"threshold {thr:.3f}")
    ax.set(xlabel="P(crack)", ylabel="density" if compare else "images")
    ax.legend(fontsize=8)
    img = page.fig("histogram.png", fig, "histogram of crack probabilities")
    if not len(prev):
        return img + "<p id='no-previous'>No previous night scored by this model: nothing to compare.</p>"
    prev_share = float((prev >= thr).mean())
    delta, ks = share - prev_share, ks_statistic(probs, prev)
    mean_delta = float(probs.mean() - prev.mean()) if len(probs) else None
    drift = abs(delta) >= 0.05 or ks >= 0.2
    verdict = (
        "<p class='drift' id='drift-alert'><b>Drift:</b> the flagged share or the score distribution "
        "moved noticeably since the previous night; check the input (new site, camera, lighting) "
        "before trusting tonight's flags.</p>"
        if drift
        else "<p class='ok'>No notable drift.</p>"
    )
    return (
        img
        + "<table><tr><th class='l'>previous night</th><td id='previous-night'>"
        + esc(prev_night)
        + f"</td></tr><tr><th class='l'>share flagged then</th>{td('previous-flagged-share', prev_share)}</tr>"
        + f"<tr><th class='l'>change in share flagged</th>{td('flagged-share-delta', delta)}</tr>"
        + f"<tr><th class='l'>mean P(crack) change</th>{td('mean-delta', mean_delta)}</tr>"
        + f"<tr><th class='l'>KS statistic (0 same, 1 disjoint)</th>{td('ks-statistic', ks)}</tr></table>"
        + verdict
    )
