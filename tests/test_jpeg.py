"""JPEG decoding without TensorFlow (``crackscale.imaging.jpeg``): TensorFlow's pixels, bit for bit, on every
kind of JPEG a camera or encoder writes; damaged files still get TensorFlow's answer; a CPU scoring
actor with a LiteRT artifact never imports TensorFlow."""

from __future__ import annotations

import functools
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PY, REAL_DATA, ROOT
from PIL import Image

from crackscale.config.loader import ConfigError
from crackscale.config.score import ScoreConfig
from crackscale.data import synth
from crackscale.imaging import header, jpeg
from crackscale.scoring import decode as scoring_decode

TF = ScoreConfig(decoder="tf", max_pixels=10_000_000)
AUTO = ScoreConfig(decoder="auto", max_pixels=10_000_000)


def encode(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@functools.cache
def variants() -> dict[str, bytes]:
    """JPEGs of every chroma subsampling, grayscale, progressive, odd and non-square sizes, and all
    eight EXIF orientations (cameras write those)."""
    rng = np.random.default_rng(3)
    base, _ = synth.make_image(rng, crack=True, size=227)
    wide = base.resize((301, 203))
    out = {}
    for sub in (0, 1, 2):  # 4:4:4, 4:2:2, 4:2:0
        out[f"227-sub{sub}"] = encode(base, quality=90, subsampling=sub)
        out[f"301x203-sub{sub}-q60"] = encode(wide, quality=60, subsampling=sub)
    out["odd-33x17"] = encode(base.resize((33, 17)), quality=85)
    out["odd-17x45"] = encode(base.resize((17, 45)), quality=85, subsampling=1)
    out["gray"] = encode(base.convert("L"), quality=80)
    out["progressive"] = encode(wide, quality=85, progressive=True)
    out["optimized-q100"] = encode(base, quality=100, optimize=True)
    mpo = io.BytesIO()  # multi-picture JPEG (stereo and phone cameras): scored on its first picture
    base.save(mpo, "MPO", save_all=True, append_images=[wide], quality=85)
    out["mpo"] = mpo.getvalue()
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        out[f"exif{o}"] = encode(wide, quality=85, exif=exif.tobytes())
    return out


def test_check_digests_are_tensorflows_pixels():
    """The constants every actor checks itself against are what TensorFlow gives on this machine."""
    import tensorflow as tf

    from crackscale.imaging import tfdecode

    blob = jpeg.CHECK_FILE.read_bytes()
    want = {0: jpeg._digest(tf.io.decode_image(blob, channels=3, expand_animations=False).numpy())}
    for size in jpeg.CHECK_DIGESTS:
        if size:  # exactly what training feeds the model (tfdata.tf_dataset rounds tfdecode.decode to uint8)
            want[size] = jpeg._digest(tf.cast(tf.round(tfdecode.decode(blob, size, False)), tf.uint8).numpy())
    assert want == jpeg.CHECK_DIGESTS
    assert jpeg.check_digests() == jpeg.CHECK_DIGESTS and jpeg.mismatches() == [] and jpeg.available()


@pytest.mark.parametrize("size", [160, 64, 300])
def test_same_pixels_as_tensorflow_on_every_kind_of_jpeg(size):
    for name, blob in variants().items():
        orientation = header.header(blob, "x.jpg", TF)[0]
        fast = jpeg.decode(blob, size, orientation)
        assert fast is not None, name  # decoded without TensorFlow, not handed over to it
        want, err = scoring_decode.decode_image(blob, "x.jpg", size, TF, antialias=False)
        assert err == "" and fast.shape == want.shape == (size, size, 3), (name, err)
        assert np.array_equal(fast, want), (name, int(np.abs(fast.astype(int) - want).max()))
        got, err = scoring_decode.decode_image(blob, "x.jpg", size, AUTO, antialias=False)
        assert err == "" and np.array_equal(got, want), name
    first = encode(synth.make_image(np.random.default_rng(3), crack=True, size=227)[0], quality=85)
    assert np.array_equal(jpeg.decode(variants()["mpo"], size), jpeg.decode(first, size))


def test_same_pixels_on_the_real_sample(synth_data):
    """Every 20th real image when ../shared/data is present (else every synthetic one), through
    ``decode_batch`` both ways."""
    files = sorted(REAL_DATA.glob("*/*.jpg"))[::20] if REAL_DATA.is_dir() else sorted(synth_data.glob("*/*.jpg"))
    assert len(files) >= 40
    batch = {"uri": np.array([str(f) for f in files], dtype=object), "size": np.full(len(files), -1)}
    a = scoring_decode.decode_batch(batch, 160, AUTO, False)
    b = scoring_decode.decode_batch(batch, 160, TF, False)
    assert not any(a["error"]) and not any(b["error"])
    assert np.array_equal(a["image"], b["image"])


def test_resize_compiles_where_numba_cannot_cache(monkeypatch):
    """A read-only install without a home directory: numba has nowhere to cache; compiled per process."""
    import importlib

    from numba.core import caching

    from crackscale.imaging import resize as resize_kernel

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    monkeypatch.setattr(jpeg, "_state", {})
    try:
        importlib.reload(resize_kernel)
        assert resize_kernel.resize._cache.__class__.__name__ == "NullCache"
        assert jpeg.available() and jpeg.check_digests() == jpeg.CHECK_DIGESTS
    finally:
        monkeypatch.undo()
        importlib.reload(resize_kernel)


def test_resize_is_loaded_from_numba_cache_in_a_new_process():
    """Each scoring actor is a new process: the second one must load the compiled resize from the disk
    cache, not compile it again (numba keys a closure kernel by its captured variables, so one would
    be compiled again, and add a cache file, in every process)."""
    code = """
import json
from crackscale.imaging import jpeg
from crackscale.imaging import resize as resize_kernel
assert jpeg.available()
s = resize_kernel.resize.stats
print(json.dumps([sum(s.cache_hits.values()), sum(s.cache_misses.values())]))
"""
    from crackscale.imaging import resize as resize_kernel

    cache = Path(resize_kernel.resize._cache._cache_path)

    def run() -> list[int]:
        out = subprocess.run([PY, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        return json.loads(out.splitlines()[-1])

    run()  # compiles and caches it if no earlier process did
    files = sorted(p.name for p in cache.glob("resize_kernel.*"))
    assert run() == [1, 0]  # one hit (one signature), no compile
    assert sorted(p.name for p in cache.glob("resize_kernel.*")) == files


def test_damaged_jpegs_get_tensorflows_answer_and_antialias_uses_tensorflow():
    blob = variants()["227-sub2"]
    for name, bad in {
        "truncated": blob[: len(blob) // 2],
        "corrupt": blob[:600] + bytes(range(256)) * 8,
        "no-eoi": blob[:-2],
    }.items():
        assert jpeg.decode(bad, 64) is None or name == "no-eoi", name  # libjpeg's warnings are not ignored
        assert (
            scoring_decode.decode_image(bad, "x.jpg", 64, AUTO)[1]
            == scoring_decode.decode_image(bad, "x.jpg", 64, TF)[1]
        ), name
    assert scoring_decode.fast_jpeg(AUTO, antialias=False) and not scoring_decode.fast_jpeg(AUTO, antialias=True)
    assert not scoring_decode.fast_jpeg(TF, antialias=False)
    with pytest.raises(ConfigError, match="'decoder' must be auto or tf"):
        ScoreConfig(decoder="pil").validate()


def test_cpu_actor_scores_jpegs_without_importing_tensorflow(model_artifact, synth_data, tmp_path):
    """A Predictor that reads and decodes (``decode: actor``) with the artifact's LiteRT export: the
    process never imports TensorFlow. A PNG in a later batch still decodes (TensorFlow, then)."""
    code = f"""
import sys, numpy as np, glob, io
from PIL import Image
from crackscale.scoring import predictor
from crackscale.config.score import ScoreConfig
cfg = ScoreConfig(model={model_artifact["uri"]!r})
p = predictor.Predictor(cfg, decode={{"image_size": 64, "cfg": cfg, "antialias": False}})
files = sorted(glob.glob({str(synth_data)!r} + "/*/*.jpg"))[:12]
out = p({{"uri": np.array(files, dtype=object), "size": np.full(len(files), -1)}})
assert not any(out["error"]) and np.isfinite(out["crack_probability"]).all(), out["error"]
print("tf-after-jpeg", "tensorflow" in sys.modules, p.info["runtime"])
png = {str(tmp_path / "a.png")!r}
Image.open(files[0]).save(png)
out = p({{"uri": np.array([png], dtype=object), "size": np.full(1, -1)}})
print("tf-after-png", "tensorflow" in sys.modules, out["error"][0] == "")
"""
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert "tf-after-jpeg False litert" in lines, r.stdout + r.stderr[-2000:]
    assert "tf-after-png True True" in lines, r.stdout
