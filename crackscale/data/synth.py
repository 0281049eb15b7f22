"""Synthetic concrete textures with and without cracks: the demo's data and the tests' fast data.

Concrete: a mottled grey base (blurred noise at two scales), aggregate speckles and pores, and on
some uncracked images stains and scratches as distractors. Crack: a jagged random walk across the
image, dark, 1–4 px wide, with branches. Each file's name carries its number so the same grouping
rules as the real data apply. Returns the crack centreline mask when asked (Grad-CAM checks).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)


def _texture(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.uniform(140, 200)
    coarse = rng.normal(0, 1, (size // 16 + 2, size // 16 + 2))
    coarse = np.array(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BICUBIC))
    fine = rng.normal(0, 1, (size, size))
    img = base + 14 * coarse + 9 * fine
    # pores: small dark dots
    for _ in range(rng.integers(5, 30)):
        y, x = rng.integers(0, size, 2)
        r = rng.integers(1, 3)
        img[max(0, y - r) : y + r, max(0, x - r) : x + r] -= rng.uniform(20, 50)
    tint = rng.uniform(-6, 6, 3)
    rgb = np.clip(img[..., None] + tint[None, None, :], 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))


def _walk(rng: np.random.Generator, size: int) -> list[tuple[float, float]]:
    side = rng.integers(0, 4)
    t = rng.uniform(0.1, 0.9) * size
    x, y = [(t, 0.0), (size - 1.0, t), (t, size - 1.0), (0.0, t)][side]
    target = np.array([size / 2, size / 2]) + rng.normal(0, size / 6, 2)
    heading = np.arctan2(target[1] - y, target[0] - x)
    pts = [(x, y)]
    step = size / 40
    for _ in range(400):
        heading += rng.normal(0, 0.35)
        x += step * np.cos(heading)
        y += step * np.sin(heading)
        pts.append((x, y))
        if not (-2 <= x <= size + 1 and -2 <= y <= size + 1):
            break
    return pts


def make_image(rng: np.random.Generator, crack: bool, size: int = 227) -> tuple[Image.Image, np.ndarray]:
    """One synthetic image and its crack mask (all False when ``crack`` is False)."""
    img = _texture(rng, size)
    draw = ImageDraw.Draw(img)
    mask_img = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask_img)
    if crack:
        for i in range(int(rng.integers(1, 3))):
            pts = _walk(rng, size)
            if i > 0:  # a branch starts on the first crack
                pts = pts[: max(2, len(pts) // 2)]
            width = int(rng.integers(2, 5)) if i == 0 else int(rng.integers(1, 3))
            shade = int(rng.uniform(25, 70))
            draw.line(pts, fill=(shade, shade, shade), width=width, joint="curve")
            mdraw.line(pts, fill=255, width=width + 2)
    elif rng.uniform() < 0.5:
        # distractors: a faint stain or a short light scratch, not a crack
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 10, size // 4))
        stain = int(rng.uniform(110, 150))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(stain, stain, stain))
        img = img.filter(ImageFilter.GaussianBlur(1.5))
    return img, np.array(mask_img) > 0


def generate(
    out_dir: str | Path,
    per_class: int = 200,
    size: int = 227,
    seed: int = 0,
    class_names: tuple[str, str] = ("Negative", "Positive"),
) -> Path:
    """Write ``per_class`` JPEGs into ``out_dir/<class>/NNNNN.jpg`` for each class (idempotent)."""
    out = Path(out_dir)
    for label, name in enumerate(class_names):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, label])
        for i in range(1, per_class + 1):
            path = d / f"{i:05d}.jpg"
            img, _ = make_image(rng, crack=bool(label), size=size)
            if path.exists():
                continue
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(rng.integers(80, 95)))
            path.write_bytes(buf.getvalue())
    log.info("synthetic data: %d images per class in %s", per_class, out)
    return out


def photos(out_dir: str | Path, n: int = 1, cols: int = 8, rows: int = 6, size: int = 227, seed: int = 0) -> list[Path]:
    """Write ``n`` whole "inspection photos" of ``cols`` × ``rows`` synthetic crops of ``size`` px
    (``photo-NNN.jpg``), about a third of the cells cracked, and beside each the crack cells it holds
    (``photo-NNN.cells.json``: [row, col] pairs); idempotent."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    written = []
    for k in range(n):
        crack = rng.random((rows, cols)) < 1 / 3
        cells = [
            [np.asarray(make_image(rng, crack=bool(crack[r, c]), size=size)[0]) for c in range(cols)]
            for r in range(rows)
        ]
        path = out / f"photo-{k:03d}.jpg"
        if not path.exists():
            img = np.concatenate([np.concatenate(row, axis=1) for row in cells], axis=0)
            Image.fromarray(img).save(path, quality=92)
            path.with_suffix(".cells.json").write_text(json.dumps(np.argwhere(crack).tolist()))
        written.append(path)
    log.info("synthetic photos: %d of %dx%d crops in %s", n, cols, rows, out)
    return written


def photo_set(out_dir: str | Path, n: int = 2, cols: int = 4, rows: int = 3, size: int = 227, seed: int = 0) -> Path:
    """A photo set as training and ``crackscale evaluate`` read it: ``n`` photos of ``cols`` ×
    ``rows`` synthetic crops in ``out_dir/photos/photo-NNN.jpg``, about a third of the cells
    cracked, and each photo's crack mask in ``out_dir/masks/photo-NNN.png`` (crack = 255);
    idempotent."""
    out = Path(out_dir)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 3])
    for k in range(n):
        crack = rng.random((rows, cols)) < 1 / 3
        cells = [[make_image(rng, crack=bool(crack[r, c]), size=size) for c in range(cols)] for r in range(rows)]
        path = out / "photos" / f"photo-{k:03d}.jpg"
        if path.exists():
            continue
        img = np.concatenate([np.concatenate([np.asarray(i) for i, _ in row], axis=1) for row in cells], axis=0)
        mask = np.concatenate([np.concatenate([m for _, m in row], axis=1) for row in cells], axis=0)
        Image.fromarray(img).save(path, quality=92)
        Image.fromarray((mask * 255).astype(np.uint8)).convert("1").save(out / "masks" / f"photo-{k:03d}.png")
    log.info("synthetic photo set: %d photos of %dx%d crops with masks in %s", n, cols, rows, out)
    return out
