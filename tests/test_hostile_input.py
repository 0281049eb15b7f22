"""Hostile and odd input: every file yields exactly one row (a score or an error), the job
completes, a decompression bomb is refused before decoding, odd object keys (spaces, unicode,
``..`` segments, 1,000-character names) never move an output outside its prefix, and a model
artifact that carries code is refused."""

from __future__ import annotations

import io
import json
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import files_under
from PIL import Image

from crackscale import artifact, query
from crackscale.config.score import ScoreConfig
from crackscale.config.storage import StorageConfig
from crackscale.scoring import decode as scoring_decode
from crackscale.scoring import run as scoring_run

EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".tiff", ".bmp")


def _img(mode: str, size=(96, 72), color=None) -> Image.Image:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode) if color is None else Image.new(mode, size, color)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(side: int = 30000) -> bytes:
    """A valid 1-bit grayscale PNG of side×side pixels (~110 KB; 900 M pixels when decoded)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(side // 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> tuple[bytes, bytes]:
    """(a JPEG stored sideways with EXIF orientation 6, the same picture stored upright)."""
    upright = np.zeros((64, 96, 3), np.uint8)
    upright[:, :48] = (250, 20, 20)  # left half red, right half blue: rotation changes the picture
    upright[:, 48:] = (20, 20, 250)
    im = Image.fromarray(upright)
    stored = im.transpose(Image.Transpose.ROTATE_90)  # orientation 6 = rotate 90° CW to display
    exif = stored.getexif()
    exif[0x0112] = 6
    return _save(stored, "JPEG", exif=exif.tobytes(), quality=95), _save(im, "JPEG", quality=95)


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """name → (content, expected: "ok" or the error prefix). Names are valid local file names."""
    good = _save(_img("RGB"), "JPEG")
    gif = io.BytesIO()
    frames = [_img("RGB", color=(i * 40, 0, 0)).convert("P") for i in range(3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    rotated, _ = exif_rotated_jpeg()
    return {
        "truncated.jpg": (good[: len(good) // 2], "decode:"),
        "zero-byte.jpg": (b"", "empty file"),
        "notes.jpg": (b"crack report: none found\n", "decode: not an image"),
        "page.jpg": (b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", "decode: not an image"),
        "rgba.png": (_save(_img("RGBA"), "PNG"), "ok"),
        "palette.png": (_save(_img("RGB").convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "ok"),
        "sixteen-bit.png": (
            _save(Image.fromarray((np.arange(72 * 96, dtype=np.uint16) * 9).reshape(72, 96)), "PNG"),
            "ok",
        ),
        "gray.jpg": (_save(_img("L"), "JPEG"), "ok"),
        "cmyk.jpg": (_save(_img("CMYK"), "JPEG"), "ok"),
        "exif-rotated.jpg": (rotated, "ok"),
        "one-pixel.png": (_save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "ok"),
        "bomb.png": (png_bomb(), "too large:"),
        "animated.gif": (gif.getvalue(), "unsupported: format GIF"),
        "gif-named.jpg": (gif.getvalue(), "unsupported: format GIF"),
        "photo.webp": (_save(_img("RGB"), "WEBP"), "ok"),
        "scan.tiff": (_save(_img("RGB"), "TIFF"), "ok"),
        "scan16.tiff": (
            _save(Image.fromarray((np.arange(72 * 96, dtype=np.uint16) * 9).reshape(72, 96)), "TIFF"),
            "ok",
        ),
        "with space ünïcödé 裂缝 🙂.jpg": (good, "ok"),
        "double..dots..jpg": (good, "ok"),
        'quote"d, comma.jpg': (good, "ok"),  # a leading "." is a hidden file: not listed locally
    }


def score_cfg(**kw) -> ScoreConfig:
    # with .gif listed, GIF is a scored format: an animated GIF is scored on its first frame
    base = dict(extensions=EXTS, batch_size=8, block_size=8, chunk_size=8, runtime="tf", num_actors=1, read_threads=4)
    base.update(kw)
    return ScoreConfig(**base)


def test_each_hostile_file_scores_or_errors_and_the_bomb_is_not_decoded():
    cfg = score_cfg(extensions=(".jpg", ".jpeg", ".png", ".webp", ".tiff"))
    files = hostile_files()
    bomb = files.pop("bomb.png")[0]
    for name, (blob, want) in files.items():
        if name == "animated.gif":
            continue  # listed only with .gif in extensions; see the pipeline test
        img, err = scoring_decode.decode_image(blob, name, 64, cfg)
        if want == "ok":
            assert err == "" and img.shape == (64, 64, 3) and img.dtype == np.uint8, (name, err)
        else:
            assert img is None and err.startswith(want), (name, err)
    # 30000×30000 would need 2.7 GB as RGB uint8: refused from its header, memory stays flat
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; TF is warm
    img, err = scoring_decode.decode_image(bomb, "bomb.png", 64, cfg)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert img is None and err.startswith("too large:"), err
    assert grown_mb < 200, f"peak RSS grew by {grown_mb:.0f} MB while refusing a decompression bomb"
    # a bomb below PIL's own limit (2 × 89 M pixels) is refused by max_pixels
    err = scoring_decode.decode_image(png_bomb(12000), "b.png", 64, cfg)[1]
    assert err == "too large: 12000x12000 pixels > max_pixels 120000000", err
    # EXIF-rotated JPEG is scored upright: it decodes like the upright picture, not the stored one
    rotated, upright = exif_rotated_jpeg()
    a = scoring_decode.decode_image(rotated, "r.jpg", 32, cfg)[0].astype(int)
    b = scoring_decode.decode_image(upright, "u.jpg", 32, cfg)[0].astype(int)
    assert np.abs(a - b).mean() < 8, np.abs(a - b).mean()
    assert a[:, :12, 0].mean() > 200 and a[:, -12:, 2].mean() > 200  # red left, blue right


def _expected_error(uri: str, want: str, row_error: str | None) -> bool:
    return row_error is None if want == "ok" else bool(row_error and row_error.startswith(want))


@pytest.mark.slow
def test_hostile_folder_and_bucket_one_row_per_file(ray_local, s3_server, s3_bucket, model_artifact, tmp_path):
    import boto3

    files = hostile_files()
    for name in ("animated.gif", "gif-named.jpg"):  # GIF is listed here: first frame scored
        files[name] = (files[name][0], "ok")
    src = tmp_path / "in" / "night 1 ✓"
    src.mkdir(parents=True)
    for name, (blob, _) in files.items():
        (src / name).write_bytes(blob)
    out = tmp_path / "out" / "scores"
    before = set(files_under(tmp_path))
    cfg = score_cfg(
        model=model_artifact["uri"], input=str(tmp_path / "in"), output=str(out), cache_dir=str(tmp_path / "cache")
    )
    s = scoring_run.run(cfg)
    assert s["listed"] == len(files) and s["scored"] + s["failed"] == len(files)
    rows = {Path(r["uri"]).name: r for r in query.open_scores(str(out)).to_table().to_pylist()}
    assert sorted(rows) == sorted(files)
    for name, (_, want) in files.items():
        assert _expected_error(name, want, rows[name]["error"]), (name, rows[name]["error"])
        assert (rows[name]["crack_probability"] is None) == (want != "ok")
    new = set(files_under(tmp_path)) - before
    outside = [p for p in new if out not in p.parents and (tmp_path / "cache") not in p.parents]
    assert not outside, outside

    # the same files on S3, plus keys no file system allows: `..` segments, '//' and 1,000 chars
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = {f"in/{name}": want for name, (_, want) in files.items()}
    blobs = {f"in/{name}": blob for name, (blob, _) in files.items()}
    good = files["rgba.png"][0]
    odd = {
        "in/../../escape/up.png": "ok",
        "in/a/../../../../etc/passwd.png": "ok",
        "in/" + "x" * 990 + ".png": "ok",
        "in/deep/" + "/".join(["ü" * 40] * 6) + ".png": "ok",
    }
    for k in odd:
        keys[k], blobs[k] = odd[k], good
    for k, blob in blobs.items():
        assert len(k.encode()) <= 1024
        s3.put_object(Bucket=s3_bucket, Key=k, Body=blob)
    stored = {
        o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket) for o in p.get("Contents", [])
    }
    assert stored == set(keys), stored ^ set(keys)  # the server kept the odd keys verbatim
    s3cfg = score_cfg(
        model=model_artifact["uri"],
        input=f"s3://{s3_bucket}/in/",
        output=f"s3://{s3_bucket}/out/scores",
        cache_dir=str(tmp_path / "cache"),
        storage=StorageConfig(s3_endpoint=s3_server),
    )
    s = scoring_run.run(s3cfg)
    assert s["listed"] == len(keys) and s["scored"] + s["failed"] == len(keys)
    t = query.open_scores(s3cfg.output, s3cfg.storage).to_table()
    rows = {r["uri"][len(f"s3://{s3_bucket}/") :]: r for r in t.to_pylist()}
    assert len(rows) == t.num_rows == len(keys) and set(rows) == set(keys)
    bad = {k: rows[k]["error"] for k, want in keys.items() if not _expected_error(k, want, rows[k]["error"])}
    # an odd key may be refused by the S3 client as an error row ("read: …"), never mis-scored
    assert all(k in odd and (e or "").startswith("read:") for k, e in bad.items()), bad
    after = {
        o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket) for o in p.get("Contents", [])
    }
    assert all(k.startswith("out/scores/") for k in after - stored), after - stored


# ---- model artifacts that carry code ------------------------------------------------------------


def _evil_model(marker: Path):
    from crackscale.model import keras

    k = keras()

    path = str(marker)

    def evil(x):  # would run at load time if the artifact's code were executed
        open(path, "w").write("code from the artifact ran")
        return x

    inp = k.Input((8, 8, 3))
    x = k.layers.Lambda(evil)(inp)
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inp, k.layers.Dense(1, activation="sigmoid")(x))


def test_artifact_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    model = _evil_model(marker)
    uri = str(tmp_path / "evil")
    artifact.save(model, {"name": "evil", "image_size": 8, "threshold": 0.5}, uri)  # valid checksum
    marker.unlink(missing_ok=True)  # saving traced the Lambda once; only loading matters here
    with pytest.raises(artifact.ArtifactError, match=r"refused by Keras safe mode: .*Lambda"):
        artifact.load(uri)
    assert not marker.exists()

    # a legacy .h5 file runs a Lambda's bytecode even with safe_mode=True: refused by name, with
    # a model.json whose checksum matches (an attacker who controls the artifact can do that)
    model.save(Path(uri, "model.h5"))
    marker.unlink(missing_ok=True)
    meta = json.loads(Path(uri, "model.json").read_text())
    meta.update(model_file="model.h5", model_sha256=artifact.sha256_file(Path(uri, "model.h5")))
    Path(uri, "model.json").write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match=r"model_file 'model.h5' refused"):
        artifact.load(uri)
    meta.update(model_file="../../elsewhere/model.keras")
    Path(uri, "model.json").write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match=r"refused"):
        artifact.load(uri)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("error", "want"),
    [
        (ValueError("bad header\n  at byte 12\n  traceback..."), "bad header"),
        (OSError("\n\n  cannot identify image file  \nmore"), "cannot identify image file"),
        (KeyError(), "KeyError"),
        (RuntimeError("   \n  "), "RuntimeError"),
    ],
)
def test_an_error_is_named_by_its_first_line(error, want):
    from crackscale.errors import first_line

    assert first_line(error) == want
