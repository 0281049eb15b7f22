"""Whole photos as tiles: a photo larger than the crops the model learned from is cut into tiles of
that size in source pixels (sliding-window classification), each resized to the model's input as
training resized its crops, and scored; the photo's verdict is its highest tile.

The grid (``imaging.grid``, which training cuts photos with too): ``tile_overlap`` of a tile's side
is shared by neighbouring tiles, and the last tile of a row or column is shifted inward to end at
the photo's edge, so every pixel is in some tile. A photo whose longer side is at most
``tile_above`` tile sides is scored whole, as a crop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from crackscale.config.score import ScoreConfig
from crackscale.imaging import grid as grid_
from crackscale.imaging import photo

TILES_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("row", pa.int32()),
        ("col", pa.int32()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("w", pa.int32()),
        ("h", pa.int32()),
        ("probability", pa.float32()),
        ("run_id", pa.string()),
    ]
)


def tile_side(meta: dict[str, Any], cfg: ScoreConfig) -> int:
    """The tile side in source pixels: ``tile_size``, else the artifact's ``source_size`` (0: the
    artifact records none and photos are scored whole)."""
    return int(cfg.tile_size or meta.get("source_size") or 0)


def tiled(width: int, height: int, side: int, cfg: ScoreConfig) -> bool:
    """Whether a photo of this size is cut into tiles."""
    return grid_.tiled(width, height, side, cfg.tile_above)


grid = grid_.grid


def cut(img: np.ndarray, side: int, overlap: float, image_size: int, antialias: bool) -> Iterator[np.ndarray]:
    """The photo's tiles in grid order, each resized to ``image_size`` (uint8 [s, s, 3])."""
    height, width = img.shape[:2]
    for _, _, x, y, w, h in grid(width, height, side, overlap):
        yield photo.resize(img[y : y + h, x : x + w], image_size, antialias)


class TileScorer:
    """Collects tiles from any number of photos, predicts them ``batch`` at a time (batches span
    photos), and keeps each photo's probabilities in grid order."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], batch: int) -> None:
        self._predict, self._batch = predict, max(1, batch)
        self._tiles: list[np.ndarray] = []
        self._owners: list[int] = []
        self.probabilities: dict[int, list[float]] = {}

    def add(self, row: int, tile: np.ndarray) -> None:
        self._tiles.append(tile)
        self._owners.append(row)
        if len(self._tiles) >= self._batch:
            self.flush()

    def flush(self) -> None:
        if not self._tiles:
            return
        p = self._predict(np.stack(self._tiles))
        for row, v in zip(self._owners, p):
            self.probabilities.setdefault(row, []).append(float(v))
        self._tiles, self._owners = [], []


def table(rows: pa.Table, side: int, overlap: float, run_id: str) -> pa.Table:
    """The tiles rows of a chunk's tiled photos (``tile_probs`` float32 bytes in grid order)."""
    cols: dict[str, list[Any]] = {name: [] for name in TILES_SCHEMA.names}
    if "tile_probs" not in rows.column_names:
        return pa.table(cols, schema=TILES_SCHEMA)
    for uri, width, height, blob in zip(
        rows["uri"].to_pylist(), rows["width"].to_pylist(), rows["height"].to_pylist(), rows["tile_probs"].to_pylist()
    ):
        if not blob:
            continue
        probs = np.frombuffer(blob, np.float32)
        cells = grid(width, height, side, overlap)
        if len(cells) != len(probs):
            raise ValueError(f"{uri}: {len(probs)} tile probabilities for a grid of {len(cells)} tiles")
        for (r, c, x, y, w, h), p in zip(cells, probs):
            for name, v in zip(TILES_SCHEMA.names, (uri, r, c, x, y, w, h, float(p), run_id)):
                cols[name].append(v)
    return pa.table(cols, schema=TILES_SCHEMA)
