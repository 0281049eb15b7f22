"""What a scoring report shows about whole photos and sites: a crack map for each photo with a crack
(its thumbnail with the tiles' probabilities as a heat overlay and the crack tiles outlined), a
summary per site (the input folder an image is in), and a review queue (the images whose
probability is closest to the threshold, for a person to check)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.reports.page import Page, esc, num

MAP_WIDTH = 480  # pixels of a crack map's longer side


def _cell(v: Any) -> str:
    return f'<td data-value="{esc(v)}">{esc(num(v))}</td>'


def crack_map(blob: bytes, cells: list[tuple[int, int, int, int, float]], threshold: float) -> bytes:
    """PNG: the photo's thumbnail, tile probabilities as a heat overlay (overlapping tiles: their
    highest), crack tiles (``p >= threshold``) outlined. ``cells``: (x, y, w, h, p) in upright
    source pixels."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageOps

    width = max(x + w for x, _, w, _, _ in cells)
    height = max(y + h for _, y, _, h, _ in cells)
    scale = MAP_WIDTH / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    with Image.open(io.BytesIO(blob)) as im:
        im.draft("RGB", size)  # JPEG: decoded at a reduced scale, not in full
        pic = ImageOps.exif_transpose(im).convert("RGB").resize(size, Image.BILINEAR)
    heat = np.zeros((size[1], size[0]), np.float32)
    boxes = []
    for x, y, w, h, p in cells:
        x0, y0, x1, y1 = (round(v * scale) for v in (x, y, x + w, y + h))
        heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], p)
        if p >= threshold:
            boxes.append((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)))
    rgba = colormaps["inferno"](heat)
    alpha = (0.4 * heat)[:, :, None]  # the photo stays readable under the heat
    out = (np.asarray(pic, np.float32) * (1 - alpha) + rgba[:, :, :3] * 255 * alpha).astype(np.uint8)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    for box in boxes:
        draw.rectangle(box, outline=(0, 255, 255), width=2)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def photo_gallery(page: Page, con: Any, run_id: str, threshold: float, cfg: StorageConfig | None, n: int) -> str:
    """Crack maps of the run's photos with a crack (most crack tiles first, at most ``n``)."""
    photos = (
        con.sql(
            "SELECT uri, crack_tiles, tiles, crack_probability FROM scores WHERE run_id = ? AND crack "
            "AND tiles > 1 ORDER BY crack_tiles DESC, crack_probability DESC, uri LIMIT ?",
            params=[run_id, n],
        )
        .to_arrow_table()
        .to_pylist()
    )
    if not photos:
        return "<p id='no-photos'>No photo scored as tiles has a crack in this run.</p>"
    figures = []
    for i, r in enumerate(photos):
        cells = con.sql(
            "SELECT x, y, w, h, probability FROM tiles WHERE uri = ? AND run_id = ?", params=[r["uri"], run_id]
        ).fetchall()
        try:
            img = page.png(
                f"maps/{i:03d}.png", crack_map(storage.read_bytes(r["uri"], cfg), cells, threshold), r["uri"]
            )
        except Exception as e:  # noqa: BLE001 - the photo may be gone or unreadable now; the row stays
            img = f"<p class='muted'>map unavailable: {esc(e)}</p>"
        figures.append(
            f'<figure class="photo" data-uri="{esc(r["uri"])}" data-crack-tiles="{r["crack_tiles"]}">{img}'
            f"<figcaption>{r['crack_tiles']} of {r['tiles']} tiles p ≥ {threshold:.3f}, max p="
            f"{r['crack_probability']:.4f}<br>{esc(r['uri'])}</figcaption></figure>"
        )
    return f"<div class='grid'>{''.join(figures)}</div>"


def sites(con: Any, run_id: str) -> str:
    """Images, cracks, crack tiles and failures per site (the folder an image is in)."""
    rows = con.sql(
        "SELECT regexp_replace(uri, '[^/]*$', '') AS site, count(*) AS images, count(*) FILTER (WHERE crack), "
        "coalesce(sum(crack_tiles), 0), count(error) FROM scores WHERE run_id = ? GROUP BY site ORDER BY site",
        params=[run_id],
    ).fetchall()
    head = "<tr><th class='l'>site</th><th>images</th><th>with a crack</th><th>crack tiles</th><th>failed</th></tr>"
    body = "".join(
        f"<tr class='site' data-site='{esc(site)}'><td class='l'>{esc(site)}</td>"
        f"{_cell(images)}{_cell(cracks)}{_cell(tiles)}{_cell(failed)}</tr>"
        for site, images, cracks, tiles, failed in rows
    )
    return f"<table id='sites'>{head}{body}</table>"


def review_queue(con: Any, run_id: str, threshold: float, n: int) -> str:
    """The ``n`` images whose probability is closest to the threshold: the model's least sure calls."""
    rows = con.sql(
        "SELECT uri, crack_probability, crack FROM scores WHERE run_id = ? AND error IS NULL "
        "ORDER BY abs(crack_probability - ?), uri LIMIT ?",
        params=[run_id, threshold, n],
    ).fetchall()
    if not rows:
        return "<p>Nothing scored in this run.</p>"
    body = "".join(
        f"<tr class='review' data-uri='{esc(uri)}'><td class='l'>{esc(uri)}</td>{_cell(p)}"
        f"<td>{'crack' if crack else 'no crack'}</td></tr>"
        for uri, p, crack in rows
    )
    return f"<table id='review'><tr><th class='l'>image</th><th>P(crack)</th><th>verdict</th></tr>{body}</table>"
