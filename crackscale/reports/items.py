"""Labelled items as the reports show them: a per-source quality table, and each wrong item as a
picture (a crop whole; a tile in its photo, outlined, beside the tile itself)."""

from __future__ import annotations

import io
from typing import Any

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.data.sources import split_item_uri
from crackscale.reports.page import Page, esc, num, thumb

COLUMNS = (
    ("n", "items", 0),
    ("cracks", "cracks", 0),
    ("recall", "recall", 4),
    ("false_alarms", "false alarms", 4),
    ("precision", "precision", 4),
    ("roc_auc", "ROC-AUC", 4),
    ("missed", "missed", 0),
    ("false_alarm_count", "false alarm items", 0),
)


def source_table(table: dict[str, dict[str, Any]], id_prefix: str = "src") -> str:
    """The per-source table: items, cracks, recall, false alarms (share of clean items flagged),
    precision, ROC-AUC, and the counts behind them."""
    head = "".join(f"<th>{esc(label)}</th>" for _, label, _ in COLUMNS)
    rows = []
    for name, entry in table.items():
        cells = "".join(
            f'<td id="{esc(f"{id_prefix}-{name}-{key}")}" data-value="{esc(entry.get(key))}">'
            f"{esc(num(entry.get(key), digits))}</td>"
            for key, _, digits in COLUMNS
        )
        rows.append(f"<tr><td class='l'>{esc(name)}</td>{cells}</tr>")
    return f"<table><tr><th class='l'>source</th>{head}</tr>{''.join(rows)}</table>"


def picture(uri: str, cfg: StorageConfig | None, size: int = 200) -> bytes:
    """PNG of an item: a crop or photo scaled into ``size``; a tile (``#x,y,w,h``) as its photo with
    the tile outlined in red, the tile itself inset in the corner."""
    from PIL import Image, ImageDraw, ImageOps

    path, box = split_item_uri(uri)
    blob = storage.read_bytes(path, cfg)
    if box is None:
        return thumb(blob, size)
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
    x, y, w, h = box
    tile = im.crop((x, y, x + w, y + h))
    scale = size / max(im.size)
    view = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    draw = ImageDraw.Draw(view)
    draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=(220, 30, 30), width=2)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(view, (0, 0))
    inset = tile.resize((size // 3, size // 3))
    canvas.paste(inset, (size - inset.width, size - inset.height))
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    return buf.getvalue()


def error_grid(
    page: Page,
    items: list[dict[str, Any]],
    threshold: float,
    limit: int,
    cfg: StorageConfig | None,
    folder: str,
    one_per_page: bool = False,
) -> str:
    """Missed cracks (lowest score first), then false alarms (highest first), as pictures, under a
    line that counts both (``id``s on a page with one grid, else ``class``es)."""
    fns = sorted((r for r in items if r["label"] == 1 and r["probability"] < threshold), key=lambda r: r["probability"])
    fps = sorted(
        (r for r in items if r["label"] == 0 and r["probability"] >= threshold), key=lambda r: -r["probability"]
    )
    cells = []
    for k, r in enumerate((fns + fps)[:limit]):
        kind = "fn" if r["label"] == 1 else "fp"
        try:
            img = page.png(f"{folder}/{k:03d}.png", picture(r["uri"], cfg), f"{kind} {r['uri']}")
        except Exception as e:  # noqa: BLE001 - an unreadable image must not sink the report
            img = f"<p class='muted'>image unavailable: {esc(str(e).splitlines()[0][:120])}</p>"
        cells.append(
            f'<figure class="{kind}" data-uri="{esc(r["uri"])}" data-probability="{r["probability"]:.6f}">{img}'
            f"<figcaption><b>{'missed crack' if kind == 'fn' else 'false alarm'}</b> "
            f"p={r['probability']:.4f}<br>{esc(r['uri'])}</figcaption></figure>"
        )
    shown = f" (first {limit} shown)" if len(fns) + len(fps) > limit else ""
    attr = "id" if one_per_page else "class"
    return (
        f"<p><span {attr}='n-false-negatives'>{len(fns)}</span> missed cracks (lowest score first) and "
        f"<span {attr}='n-false-positives'>{len(fps)}</span> false alarms{shown}.</p>"
        f"<div class='grid'>{''.join(cells)}</div>"
    )
