"""The page of ``crackscale evaluate``: the per-source table at the model's threshold, then each
source's wrong items as pictures (tiles shown in their photo)."""

from __future__ import annotations

import re
from typing import Any

from crackscale.config.storage import StorageConfig
from crackscale.reports.items import error_grid, source_table
from crackscale.reports.page import Page, esc


def evaluation_report(
    summary: dict[str, Any], items: list[dict[str, Any]], dest: str, cfg: StorageConfig | None, max_errors: int = 24
) -> str:
    """Write the page to ``dest``; returns the URI of its index.html."""
    page = Page(f"Evaluation of {summary['model']}")
    page.add(
        f"<p>Model <code>{esc(summary['model_id'])}</code>, runtime <b>{esc(summary['runtime'])}</b>, threshold "
        f"<span id='threshold'>{summary['threshold']:.4f}</span>, split <b>{esc(summary['split'])}</b>, "
        f"{summary['items']} items. False alarms are the share of clean items called crack.</p>",
        "<h2>Per source</h2>",
        source_table(summary["sources"]),
    )
    for name in summary["sources"]:
        folder = "errors/" + re.sub(r"[^\w.-]", "_", name)
        own = [r for r in items if r["source"] == name]
        page.add(
            f"<h2>{esc(name)}: wrong answers</h2>", error_grid(page, own, summary["threshold"], max_errors, cfg, folder)
        )
    return page.publish(dest, cfg)
