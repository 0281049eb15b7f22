"""The HTML page both reports are built on: escaping, number cells, PNG and matplotlib figures,
and publishing the page with its images to local or S3 storage."""

from __future__ import annotations

import html
import io
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from crackscale import storage
from crackscale.config.storage import StorageConfig

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


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def td(id_: str, v: Any, digits: int = 4) -> str:
    return f'<td id="{esc(id_)}" data-value="{esc(v)}">{esc(num(v, digits))}</td>'


class Page:
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
        return f'<img src="{esc(name)}" alt="{esc(alt)}"{f" class={cls!r}" if cls else ""}>'

    def fig(self, name: str, fig: Any, alt: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return self.png(name, buf.getvalue(), alt, "plot")

    def publish(self, dest: str, cfg: StorageConfig | None) -> str:
        """Write index.html and upload the folder to ``dest``; returns the URI of index.html."""
        (self.dir / "index.html").write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(self.title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(self.title)}</h1>{''.join(self.parts)}"
            "<p class='muted'>Images: <span id='image-count'>?</span>, broken: "
            f"<span id='broken-images'>?</span>.</p>{CHECK_IMAGES}</body></html>"
        )
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


def figure(w: float, h: float, n: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots(1, n)


def thumb(blob: bytes, size: int = 200) -> bytes:
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def safely(fn: Callable[..., str], *args: Any, **kwargs: Any) -> str:
    """``fn(*args, **kwargs)``, or "" with a warning: jobs call this after their work is committed,
    so a report that cannot be written never fails a finished training or scoring run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        log.warning("%s not written: %s", fn.__name__.replace("_", " "), e)
        return ""
