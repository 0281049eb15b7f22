"""Training sources: labelled-crop trees and photo sets with pixel masks, turned into items.

A **crop tree** is ``<uri>/<class>/<files>``: each file is one item of its folder's class. A source
may hold one class only (crack-only sets are common) when other sources bring the other.

A **photo set** is ``<uri>/photos/`` + ``<uri>/masks/``: every photo has a mask with its stem (any
image format, crack pixels non-zero). Each photo is cut on the grid scoring uses
(``imaging.grid``: ``source_size`` tiles, ``tile_overlap``, ``tile_above``), and each tile is
labelled by its window of the mask: a crack tile holds at least ``mask_min_pixels`` crack pixels, a
clean tile holds none within ``mask_margin`` pixels around it, and a tile in between (a crack that
only grazes it) is left out. A tile is kept as PNG bytes of its source pixels, so training decodes
and resizes exactly what scoring cuts from the photo.

An item's ``uri`` is its file, or for a tile ``<photo uri>#x,y,w,h`` (``item_uri``); ``read_items``
gives the bytes of either, for the exports, the reports and ``crackscale evaluate``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.config.train import SourceConfig, TrainConfig
from crackscale.imaging import grid

log = logging.getLogger(__name__)

CROPS, PHOTOS = "crops", "photos"
_TILE = re.compile(r"^(.*)#(\d+),(\d+),(\d+),(\d+)$", re.S)


class DataError(ValueError):
    """The training data is missing, empty or unusable; the message names the path."""


@dataclass
class Items:
    """What one source gave: a row (uri, source, class, label, x, y, w, h, group, sha256, width,
    height) and the encoded bytes of each item, and counts of what was left out."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list, repr=False)
    stats: dict[str, Any] = field(default_factory=dict)


def group_key(name: str, pattern: str, group_size: int) -> str:
    """Source-photo key of a file name: the regex's group 1, numeric keys bucketed by group_size."""
    m = re.search(pattern, name)
    if not m:
        return name  # no key: the image is its own group
    key = m.group(1) if m.groups() else m.group(0)
    if key.isdigit():
        return f"n{(int(key) - 1) // group_size}"
    return key


def item_uri(uri: str, x: int, y: int, w: int, h: int) -> str:
    """The URI of a tile of the photo at ``uri``."""
    return f"{uri}#{x},{y},{w},{h}"


def split_item_uri(uri: str) -> tuple[str, tuple[int, int, int, int] | None]:
    """(file URI, (x, y, w, h) of a tile or None for a whole file)."""
    m = _TILE.match(uri)
    if not m:
        return uri, None
    return m.group(1), (int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5)))


def kind(source: SourceConfig, cfg: StorageConfig | None) -> str:
    """``photos`` when the source has a ``photos/`` folder, else ``crops``; refuses a missing path."""
    if not storage.exists(source.uri, cfg):
        raise DataError(f"data path not found: {source.uri}")
    return PHOTOS if storage.exists(storage.join(source.uri, "photos"), cfg) else CROPS


def check_image(data: bytes) -> tuple[str | None, tuple[int, int]]:
    """(None, (width, height)) if ``data`` looks like a decodable image, else (the reason, (0, 0))."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file", (0, 0)
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"not a decodable image: {e}", (0, 0)
    return None, size


def read_crops(cfg: TrainConfig, source: SourceConfig, strict: bool) -> Items:
    """Every file of every class folder of a crop tree. ``strict`` (a single source): every class
    folder must exist and hold files; otherwise a source needs one non-empty class folder."""
    out = Items(stats={"kind": CROPS})
    found = 0
    for cls in cfg.class_names:
        cls_uri = storage.join(source.uri, cls)
        if not storage.exists(cls_uri, cfg.storage):
            if strict:
                raise DataError(f"class folder missing: {cls_uri} (class_names = {list(cfg.class_names)})")
            continue
        files = list(storage.list_files(cls_uri, cfg.extensions, cfg.storage))
        if cfg.limit_per_class:
            files = files[: cfg.limit_per_class]
        if not files and strict:
            raise DataError(f"class folder is empty: {cls_uri} (no files ending in {', '.join(cfg.extensions)})")
        found += len(files)
        uris = [storage.uri_of(source.uri, f.path) for f in files]
        for uri, blob in zip(uris, storage.read_many(uris, cfg.storage)):
            # label 1 = the crack class, so the model's sigmoid is P(crack) whatever the order
            label = int(cls == cfg.crack_class)
            out.rows.append({"uri": uri, "source": source.label(), "class": cls, "label": label})
            out.blobs.append(blob)
        log.info("source %s, class %s: %d files under %s", source.label(), cls, len(files), cls_uri)
    if not found:
        folders = " or ".join(storage.join(source.uri, c) for c in cfg.class_names)
        raise DataError(f"source {source.uri} is empty: no files ending in {', '.join(cfg.extensions)} in {folders}")
    return out


def _mask(data: bytes, uri: str) -> np.ndarray:
    """A mask file as a bool array (crack = any non-zero pixel)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L")) > 0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"mask {uri} is not a readable image: {e}") from None


def _photo(data: bytes, uri: str) -> np.ndarray:
    """A photo as upright uint8 RGB, decoded as scoring decodes it."""
    from PIL import UnidentifiedImageError

    from crackscale.imaging import photo

    try:
        return photo.decode_file(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"photo {uri} is not a decodable image: {e}") from None


def window_counts(mask: np.ndarray, cells: list[grid.Cell], margin: int) -> list[tuple[int, int]]:
    """(crack pixels in each cell's window, crack pixels in the window grown by ``margin``), from
    one summed-area table of the mask."""
    h, w = mask.shape
    s = np.zeros((h + 1, w + 1), np.int64)
    s[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)

    def total(x0: int, y0: int, x1: int, y1: int) -> int:
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        return int(s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0])

    return [
        (total(x, y, x + cw, y + ch), total(x - margin, y - margin, x + cw + margin, y + ch + margin))
        for _, _, x, y, cw, ch in cells
    ]


def tile_label(inside: int, around: int, min_pixels: int) -> int | None:
    """1 = crack tile, 0 = clean, None = left out (some crack pixels, fewer than ``min_pixels``, or a
    crack just outside the window)."""
    if inside >= min_pixels:
        return 1
    if around == 0:
        return 0
    return None


def _png(tile: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _pairs(cfg: TrainConfig, source: SourceConfig) -> list[tuple[str, str]]:
    """(photo URI, mask URI) of every photo; refuses a photo without a mask."""
    photos_uri, masks_uri = storage.join(source.uri, "photos"), storage.join(source.uri, "masks")
    if not storage.exists(masks_uri, cfg.storage):
        raise DataError(f"photo set {source.uri} has photos/ but no masks/ folder")
    photos = [storage.uri_of(photos_uri, f.path) for f in storage.list_files(photos_uri, cfg.extensions, cfg.storage)]
    if cfg.limit_per_class:
        photos = photos[: cfg.limit_per_class]
    if not photos:
        raise DataError(f"source {source.uri} is empty: no files ending in {', '.join(cfg.extensions)} in {photos_uri}")
    masks = {}
    for f in storage.list_files(masks_uri, None, cfg.storage):
        uri = storage.uri_of(masks_uri, f.path)
        masks.setdefault(_stem(uri), uri)
    pairs = []
    for p in photos:
        if _stem(p) not in masks:
            raise DataError(f"photo {p} has no mask in {masks_uri} (a mask per photo, same stem)")
        pairs.append((p, masks[_stem(p)]))
    return pairs


def _stem(uri: str) -> str:
    return storage.basename(uri).rsplit(".", 1)[0]


def read_photos(cfg: TrainConfig, source: SourceConfig, side: int, seen: dict[str, str]) -> Items:
    """The labelled tiles of a photo set. ``seen``: photo content hash → the URI that came first,
    across sources; a photo seen before is dropped whole (its tiles would straddle splits)."""
    out = Items(stats={"kind": PHOTOS, "photos": 0, "tiles_left_out": 0, "photos_duplicated": 0})
    pairs = _pairs(cfg, source)
    blobs = storage.read_many([u for pair in pairs for u in pair], cfg.storage)
    for i, (photo_uri, mask_uri) in enumerate(pairs):
        data, mask_data = blobs[2 * i], blobs[2 * i + 1]
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            log.warning("skipping %s: the same photo as %s", photo_uri, seen[digest])
            out.stats["photos_duplicated"] += 1
            continue
        seen[digest] = photo_uri
        img, mask = _photo(data, photo_uri), _mask(mask_data, mask_uri)
        if mask.shape != img.shape[:2]:
            raise DataError(
                f"mask {mask_uri} is {mask.shape[1]}x{mask.shape[0]}, its photo {photo_uri} is "
                f"{img.shape[1]}x{img.shape[0]}"
            )
        out.stats["photos"] += 1
        height, width = mask.shape
        cells = grid.cells(width, height, side, cfg.tile_overlap, cfg.tile_above)
        name = storage.basename(photo_uri)
        group = (
            group_key(name, source.group_pattern, source.group_size or cfg.group_size)
            if source.group_pattern
            else _stem(photo_uri)
        )
        for (_, _, x, y, w, h), (inside, around) in zip(cells, window_counts(mask, cells, cfg.mask_margin)):
            label = tile_label(inside, around, cfg.mask_min_pixels)
            if label is None:
                out.stats["tiles_left_out"] += 1
                continue
            tile = np.ascontiguousarray(img[y : y + h, x : x + w])
            cls = cfg.crack_class if label else next(c for c in cfg.class_names if c != cfg.crack_class)
            out.rows.append(
                {
                    "uri": item_uri(photo_uri, x, y, w, h),
                    "source": source.label(),
                    "class": cls,
                    "label": label,
                    "x": x,
                    "y": y,
                    "w": w,
                    "h": h,
                    "group": f"{source.label()}/{group}",
                    # the tile's pixels, not its PNG: the same tile hashes the same however it was encoded
                    "sha256": hashlib.sha256(f"{w}x{h}:".encode() + tile.tobytes()).hexdigest(),
                    "width": w,
                    "height": h,
                }
            )
            out.blobs.append(_png(tile))
    log.info(
        "source %s: %d photos → %d tiles (%d left out between clean and crack)",
        source.label(),
        out.stats["photos"],
        len(out.rows),
        out.stats["tiles_left_out"],
    )
    return out


def read_items(uris: list[str], cfg: StorageConfig | None) -> list[bytes]:
    """The encoded bytes of items by URI: a file as it is stored, a tile (``item_uri``) as PNG of
    its photo's pixels. Each photo is read and decoded once."""
    parsed = [split_item_uri(u) for u in uris]
    files = sorted({f for f, _ in parsed})
    raw = dict(zip(files, storage.read_many(files, cfg)))
    decoded: dict[str, np.ndarray] = {}
    out = []
    for f, box in parsed:
        if box is None:
            out.append(raw[f])
            continue
        if f not in decoded:
            decoded[f] = _photo(raw[f], f)
        x, y, w, h = box
        out.append(_png(np.ascontiguousarray(decoded[f][y : y + h, x : x + w])))
    return out
