"""The tile grid that training and scoring share: a photo larger than the crops a model learns
from is cut into square tiles of ``side`` source pixels, neighbours sharing ``overlap`` of a side,
the last tile of a row or column shifted inward to end at the photo's edge (every pixel is in some
tile). A photo whose longer side is at most ``above`` tile sides is one tile: the whole photo."""

from __future__ import annotations

import math

Cell = tuple[int, int, int, int, int, int]  # (row, col, x, y, w, h)


def tiled(width: int, height: int, side: int, above: float) -> bool:
    """Whether a photo of this size is cut into tiles (``side`` 0: never)."""
    return side > 0 and max(width, height) > above * side


def _starts(n: int, t: int, stride: int) -> list[int]:
    if n <= t:
        return [0]
    return [min(i * stride, n - t) for i in range(math.ceil((n - t) / stride) + 1)]


def grid(width: int, height: int, side: int, overlap: float) -> list[Cell]:
    """(row, col, x, y, w, h) of every tile, row by row; a side longer than the photo is cut to it."""
    stride = max(1, round(side * (1 - overlap)))
    tw, th = min(side, width), min(side, height)
    return [
        (r, c, x, y, tw, th)
        for r, y in enumerate(_starts(height, th, stride))
        for c, x in enumerate(_starts(width, tw, stride))
    ]


def cells(width: int, height: int, side: int, overlap: float, above: float) -> list[Cell]:
    """The grid of a photo as scoring cuts it: its tiles, or one cell that is the whole photo."""
    if tiled(width, height, side, above):
        return grid(width, height, side, overlap)
    return [(0, 0, 0, 0, width, height)]
