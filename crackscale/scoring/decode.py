"""The read + decode stage: objects → uint8 images at the artifact's ``image_size``, decoded exactly
like training (``imaging.tfdecode``: ``tf.io.decode_image`` + bilinear ``tf.image.resize`` with the
artifact's ``resize_antialias``, rounded to uint8), with EXIF orientation applied and one error
string per bad file instead of a failed block. JPEGs of models trained without antialiasing (the
default) are decoded without TensorFlow, to the same pixels (``imaging.jpeg``); TIFF and WebP,
which TensorFlow does not decode, through Pillow (``imaging.photo``). Photos larger than the
crops the model learned from are decoded at full size, one at a time, and cut into tiles
(``scoring.tiles``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from crackscale import storage
from crackscale.config.score import ScoreConfig
from crackscale.imaging import jpeg, photo
from crackscale.imaging.header import header
from crackscale.imaging.tfdecode import RESIZE_ANTIALIAS, clean_error, decoders
from crackscale.scoring import tiles

PILLOW_ONLY = ("TIFF", "WEBP")  # formats tf.io.decode_image does not read


def fast_jpeg(cfg: ScoreConfig, antialias: bool) -> bool:
    """Whether JPEGs are decoded without TensorFlow (``crackscale.imaging.jpeg``): ``decoder: auto``, a model
    trained without antialiasing, and the check image gives TensorFlow's pixels on this node."""
    if cfg.decoder != "auto" or antialias:
        return False
    return jpeg.available()


def decode_image(
    data: bytes, uri: str, image_size: int, cfg: ScoreConfig, antialias: bool = RESIZE_ANTIALIAS
) -> tuple[np.ndarray | None, str]:
    """(uint8 image, "") or (None, error) for one object, resized whole; never raises.
    ``antialias``: the artifact's ``resize_antialias`` (as its training resized)."""
    h = header(data, uri, cfg)
    if h.error:
        return None, h.error
    if h.format in PILLOW_ONLY:
        try:
            return photo.decode(data, h.format, h.orientation, image_size, antialias), ""
        except ValueError as e:
            return None, f"decode: {e}"
    if h.format == "JPEG" and fast_jpeg(cfg, antialias):
        img = jpeg.decode(data, image_size, h.orientation)
        if img is not None:
            return img, ""
    try:
        return decoders(image_size, antialias)[0](data, h.orientation).numpy(), ""
    except Exception as e:  # corrupt/truncated data
        return None, f"decode: {clean_error(e)}"


TileSink = Callable[[int, np.ndarray], None]


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: int,
    cfg: ScoreConfig,
    antialias: bool = RESIZE_ANTIALIAS,
    tile: int = 0,
    on_tile: TileSink | None = None,
    one_photo: AbstractContextManager[Any] | None = None,
) -> dict[str, np.ndarray]:
    """Read + decode a batch (a Ray Data task, or inside the model actor); adds ``image`` (zeros on
    error and for tiled photos), ``error`` ("" if ok), ``width``/``height`` (upright, -1 unknown) and
    ``n_tiles`` (0: scored whole).

    Photos larger than ``tile`` (see ``tiles.tiled``) are decoded one at a time (``one_photo``: a
    lock shared by the calls of one actor, so that it holds one full-size photo at a time) and their
    tiles go to ``on_tile(row, tile)`` as they are cut; without ``on_tile`` they are returned in
    ``tiles``.
    JPEGs are decoded without TensorFlow where ``fast_jpeg`` allows. The other objects whose header
    passes (and JPEGs libjpeg warns about) are decoded by TensorFlow in one call; if that call fails
    (a corrupt body), each is decoded on its own so that only the bad ones get an error.
    """
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    errors = [""] * n
    sizes = np.asarray(batch["size"], dtype=np.int64).copy()
    widths, heights, n_tiles = np.full(n, -1, np.int32), np.full(n, -1, np.int32), np.zeros(n, np.int32)
    kept: list[np.ndarray] = [np.zeros((0, image_size, image_size, 3), np.uint8)] * n
    todo: list[tuple[int, bytes, int]] = []
    fast = fast_jpeg(cfg, antialias)
    for i, (uri, blob) in enumerate(zip(uris, _blobs(uris, cfg))):
        if isinstance(blob, str):
            errors[i] = blob
            continue
        if sizes[i] < 0:
            sizes[i] = len(blob)
        h = header(blob, uri, cfg)
        errors[i], widths[i], heights[i] = h.error, h.width or -1, h.height or -1
        if h.error:
            continue
        try:
            if tiles.tiled(h.width, h.height, tile, cfg):
                with one_photo or nullcontext():
                    img = photo.decode_rgb(blob, h.format, h.orientation)
                    cut = tiles.cut(img, tile, cfg.tile_overlap, image_size, antialias)
                    del img  # the generator holds the photo until its last tile
                    if on_tile is None:
                        kept[i] = np.stack(list(cut))
                        n_tiles[i] = len(kept[i])
                    else:
                        for t in cut:
                            on_tile(i, t)
                            n_tiles[i] += 1
            elif h.format in PILLOW_ONLY:
                images[i] = photo.decode(blob, h.format, h.orientation, image_size, antialias)
            elif fast and h.format == "JPEG" and (img := jpeg.decode(blob, image_size, h.orientation)) is not None:
                images[i] = img
            else:
                todo.append((i, blob, h.orientation))
        except ValueError as e:  # a damaged photo (Pillow, or libjpeg through Pillow)
            errors[i] = f"decode: {e}"
    _decode_with_tf(todo, images, errors, image_size, antialias)
    out = dict(batch, size=sizes, image=images, error=np.array(errors, dtype=object))
    out.update(width=widths, height=heights, n_tiles=n_tiles)
    if on_tile is None and tile:
        out["tiles"] = np.empty(n, dtype=object)  # one array per row, of any length
        out["tiles"][:] = kept
    return out


def _decode_with_tf(
    todo: list[tuple[int, bytes, int]], images: np.ndarray, errors: list[str], image_size: int, antialias: bool
) -> None:
    """TensorFlow decodes ``todo`` in one call; if that fails (a corrupt body), one by one."""
    if not todo:
        return
    one, many = decoders(image_size, antialias)
    try:
        images[[i for i, _, _ in todo]] = many([b for _, b, _ in todo], [o for _, _, o in todo]).numpy()
    except Exception:  # at least one corrupt body: find it (them)
        for i, blob, orientation in todo:
            try:
                images[i] = one(blob, orientation).numpy()
            except Exception as e:
                errors[i] = f"decode: {clean_error(e)}"


def _blobs(uris: list[str], cfg: ScoreConfig) -> Iterator[bytes | str]:
    """Each object's bytes (or its error text), in order. Local files are read in turn (a thread
    pool costs more CPU than the reads); S3 objects ``read_threads`` at a time, at most twice that
    many read ahead of the consumer, so a batch of large photos is never all in memory."""
    if not any(storage.is_s3(u) for u in uris):
        for u in uris:
            yield _read(u, cfg)
        return
    ahead = 2 * cfg.read_threads
    with ThreadPoolExecutor(max_workers=min(cfg.read_threads, len(uris))) as pool:
        pending = deque(pool.submit(_read, u, cfg) for u in uris[:ahead])
        for u in uris[ahead:] + [None] * len(pending):
            blob = pending.popleft().result()
            if u is not None:
                pending.append(pool.submit(_read, u, cfg))
            yield blob


def _read(uri: str, cfg: ScoreConfig) -> bytes | str:
    """The object's bytes, or its error row's text (``storage.read_object``); refused credentials
    are the run's failure (``storage.RUN_FAILURE``). S3 clients are pooled for two decode calls at a
    time per actor."""
    try:
        return storage.read_object(uri, cfg.storage, pool=2 * cfg.read_threads)
    except storage.CredentialsError as e:
        return storage.RUN_FAILURE + str(e)
