"""Model runtimes: LiteRT export matches tf.keras; parity guard; the actor class without Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PY, REAL_DATA, ROOT

from crackscale import artifact
from crackscale.config.score import ScoreConfig
from crackscale.imaging import tfdecode
from crackscale.runtimes import base as rt_base
from crackscale.runtimes import keras as rt_keras
from crackscale.runtimes import litert
from crackscale.runtimes import select as rt_select
from crackscale.scoring import decode as scoring_decode
from crackscale.scoring import predictor


def sample(size: int, n: int = 48) -> np.ndarray:
    """Real images of both classes (decoded as the scorer does) when present, else synthetic."""
    if REAL_DATA.is_dir():
        cfg = ScoreConfig()
        files = (
            sorted((REAL_DATA / "Positive").glob("*.jpg"))[: n // 2]
            + sorted((REAL_DATA / "Negative").glob("*.jpg"))[: n // 2]
        )
        return np.stack([scoring_decode.decode_image(f.read_bytes(), f.name, size, cfg)[0] for f in files])
    return litert.sample_images(size, n, seed=3)


@pytest.fixture(scope="module")
def lite_cache(tmp_path_factory) -> str:
    """One LiteRT export cache for the module (each conversion takes ~10 s here)."""
    return str(tmp_path_factory.mktemp("litert-cache"))


def test_litert_matches_tf_keras(model_artifact, lite_cache):
    loaded = artifact.load(model_artifact["uri"])
    images = sample(64)
    rt, info = rt_select.select(
        loaded.model, loaded.meta, "litert", 16, threads=2, cache_dir=lite_cache, check_images=images
    )
    assert rt.name == "litert" and info["parity_max_abs_diff"] <= 1e-4
    assert litert.cache_path(lite_cache, loaded.meta["model_sha256"]).is_file()
    p_lite = rt.predict(images)
    p_keras = loaded.model.predict(images.astype(np.float32), batch_size=16, verbose=0).reshape(-1)
    assert p_lite.shape == (len(images),)
    assert p_lite.std() > 0.05, "probabilities too uniform for a meaningful parity check"
    assert np.abs(p_lite - p_keras).max() <= 1e-4
    # odd batch sizes are padded, not recompiled: same answers for a 5-image call
    assert np.abs(rt.predict(images[:5]) - p_keras[:5]).max() <= 1e-4


def test_parity_guard_refuses_a_wrong_export(model_artifact, model_artifact_v2, tmp_path):
    """A cached .tflite that is not this model (stale/corrupt cache) is caught by the parity check."""
    v1, v2 = artifact.load(model_artifact["uri"]), artifact.load(model_artifact_v2["uri"])
    litert.export_litert(v2.model, litert.cache_path(str(tmp_path), v1.meta["model_sha256"]))
    rt, info = rt_select.select(v1.model, v1.meta, "auto", 0, cache_dir=str(tmp_path))
    assert rt.name == "tf" and info["parity_max_abs_diff"] > 1e-4
    assert rt.batch_size == rt_base.DEFAULT_BATCH["tf"] == 64  # batch_size 0: tf.keras's own default
    with pytest.raises(ValueError, match="runtime: litert was requested"):
        rt_select.select(v1.model, v1.meta, "litert", 8, cache_dir=str(tmp_path))


def test_a_cached_export_is_used_only_when_its_hash_matches(model_artifact, tmp_path):
    """The LiteRT cache keeps each export's SHA-256 beside it: a damaged (or half-written) cache
    file is exported again, never loaded."""
    loaded = artifact.load(model_artifact["uri"])
    path = litert.cache_path(str(tmp_path), loaded.meta["model_sha256"])
    rt_select.select(loaded.model, loaded.meta, "litert", 8, cache_dir=str(tmp_path))
    good = path.read_bytes()
    assert litert.verified(path) and litert.digest_path(path).is_file()
    path.write_bytes(good[: len(good) // 2])  # damaged in place
    assert not litert.verified(path)
    rt, info = rt_select.select(loaded.model, loaded.meta, "litert", 8, cache_dir=str(tmp_path))
    assert rt.name == "litert" and info["parity_max_abs_diff"] <= 1e-4
    assert litert.verified(path) and path.read_bytes() == good


def test_predictor_without_ray_gpu_path_on_cpu(model_artifact, lite_cache):
    """The actor class with an injected loader; runtime=tf + use_gpu runs the GPU code path on CPU."""
    calls = []

    def loader(uri, storage_cfg):
        calls.append(uri)
        return artifact.load(uri, storage_cfg)

    images = sample(64, 8)
    batch = {
        "uri": np.array([f"u{i}" for i in range(8)], dtype=object),
        "image": images,
        "error": np.array(["", "decode: bad", "", "", "", "", "empty file", ""], dtype=object),
    }
    out = {}
    for kind, gpu in (("tf", True), ("litert", False)):
        cfg = ScoreConfig(model=model_artifact["uri"], runtime=kind, use_gpu=gpu, batch_size=4, cache_dir=lite_cache)
        pred = predictor.Predictor(cfg, loader=loader)
        res = pred(batch)
        assert "image" not in res and list(res["uri"]) == list(batch["uri"])
        assert np.isnan(res["crack_probability"][[1, 6]]).all()
        ok = res["crack_probability"][[0, 2, 3, 4, 5, 7]]
        assert ((ok >= 0) & (ok <= 1)).all()
        assert set(res["runtime"]) == {kind}
        out[kind] = ok
    assert calls == [model_artifact["uri"]] * 2  # loaded once per actor
    assert np.abs(out["tf"] - out["litert"]).max() <= 1e-4
    assert rt_keras.configure_tf(use_gpu=True) == 0  # no GPU here: memory-growth loop is a no-op


def test_predictor_that_decodes_equals_decode_tasks_then_predictor(model_artifact, synth_data, tmp_path):
    """``decode: actor``: the actor reads + decodes its batch itself (two calls may run at once,
    the model one batch at a time); same rows as ``decode_batch`` in a task followed by the actor."""
    from concurrent.futures import ThreadPoolExecutor

    bad = tmp_path / "truncated.jpg"
    good = sorted((synth_data / "Positive").glob("*.jpg"))[:6] + sorted((synth_data / "Negative").glob("*.jpg"))[:6]
    bad.write_bytes(good[0].read_bytes()[:300])
    uris = [str(p) for p in good[:6]] + [str(bad)] + [str(p) for p in good[6:]]
    batch = {
        "uri": np.array(uris, dtype=object),
        "size": np.full(len(uris), -1, np.int64),
        "chunk": np.array(["c0"] * len(uris), dtype=object),
    }
    cfg = ScoreConfig(model=model_artifact["uri"], runtime="litert", batch_size=4)
    decode = {
        "image_size": model_artifact["meta"]["image_size"],
        "cfg": cfg,
        "antialias": tfdecode.resize_antialias(model_artifact["meta"]),
    }
    split = predictor.Predictor(cfg)(scoring_decode.decode_batch(batch, **decode))
    fused = predictor.Predictor(cfg, decode=decode)
    one = fused(batch)
    assert "image" not in one and set(one) == set(split)
    assert list(one["error"]) == list(split["error"]) and one["error"][6].startswith("decode:")
    assert list(one["size"]) == [Path(u).stat().st_size for u in uris]
    np.testing.assert_array_equal(one["crack_probability"], split["crack_probability"])
    # concurrent calls (as Ray Data makes them with two calls per actor) give the same answers
    halves = [{k: v[:7] for k, v in batch.items()}, {k: v[7:] for k, v in batch.items()}] * 3
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(fused, halves))
    for part, res in zip(halves, results):
        n = len(part["uri"])
        expect = split["crack_probability"][:n] if n == 7 else split["crack_probability"][7:]
        np.testing.assert_allclose(res["crack_probability"], expect, rtol=0, atol=1e-6)


def test_predictor_starts_from_the_artifacts_own_export_without_tensorflow(model_artifact, tmp_path):
    """CPU actors load ``model.tflite`` (checksummed, parity recorded at save): no TF import, no conversion."""
    lit = model_artifact["meta"]["litert"]
    assert lit["file"] == "model.tflite" and lit["parity_on"] == "synthetic images" and lit["parity_images"] == 32
    assert 0 <= lit["parity_max_abs_diff"] <= 1e-4
    images = sample(64, 24)
    np.save(tmp_path / "x.npy", images)
    code = (
        "import json, sys, time; import numpy as np; t = time.time()\n"
        "from crackscale.scoring import predictor; from crackscale.config.score import ScoreConfig\n"
        "p = predictor.Predictor(ScoreConfig(model=sys.argv[1])); ready = time.time() - t\n"
        "x = np.load(sys.argv[2]); b = {'image': x, 'error': np.array([''] * len(x), dtype=object)}\n"
        "print(json.dumps({'info': p.info, 'tf': 'tensorflow' in sys.modules, 'ready_s': ready,\n"
        "                  'batch': p.runtime.batch_size,\n"
        "                  'p': p(b)['crack_probability'].tolist()}))"
    )
    r = subprocess.run(
        [PY, "-c", code, model_artifact["uri"], str(tmp_path / "x.npy")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["info"]["runtime"] == "litert" and out["info"]["litert"] == "artifact", out["info"]
    assert out["tf"] is False, "the LiteRT actor imported TensorFlow"
    assert out["batch"] == rt_base.DEFAULT_BATCH["litert"] == 4  # batch_size 0: LiteRT's own default
    keras = artifact.load(model_artifact["uri"]).model
    p_keras = keras.predict(images.astype(np.float32), batch_size=8, verbose=0).reshape(-1)
    assert np.abs(np.array(out["p"]) - p_keras).max() <= 1e-4


def test_a_tampered_or_missing_export_is_refused_or_redone(model_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(model_artifact["uri"], art)
    cfg = ScoreConfig(model=str(art), batch_size=8, cache_dir=str(tmp_path / "cache"))
    data = bytearray((art / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match="model.tflite of .* does not match the checksum"):
        predictor.Predictor(cfg)
    (art / "model.tflite").unlink()
    with pytest.raises(artifact.ArtifactError, match="LiteRT file missing from artifact"):
        predictor.Predictor(cfg)
    # an artifact from before exports were stored (no "litert" key): converted and checked on load
    meta = json.loads((art / "model.json").read_text())
    del meta["litert"]
    (art / "model.json").write_text(json.dumps(meta))
    pred = predictor.Predictor(cfg)
    assert pred.info["runtime"] == "litert" and pred.info["litert"] == "converted", pred.info
    assert pred.info["parity_max_abs_diff"] <= 1e-4


def test_one_model_per_run_an_artifact_replaced_mid_run_is_refused(model_artifact, model_artifact_v2, tmp_path):
    """``models/current`` republished during a run: the next attempt refuses to start (the driver
    checks model.json before each attempt) and so does any model actor that loads the new files."""
    import shutil

    from crackscale.artifact import ArtifactError
    from crackscale.scoring import run as scoring_run

    art = tmp_path / "current"
    shutil.copytree(model_artifact["uri"], art)
    first, second = model_artifact["meta"]["model_sha256"][:16], model_artifact_v2["meta"]["model_sha256"][:16]
    cfg = ScoreConfig(model=str(art), input=str(tmp_path), output=str(tmp_path / "out"), cache_dir=str(tmp_path / "c"))
    predictor.Predictor(cfg, model_id=first)  # the run's model: fine
    r = scoring_run._Run.start(cfg, 0.0)
    scoring_run._same_model(r)
    shutil.rmtree(art)
    shutil.copytree(model_artifact_v2["uri"], art)
    with pytest.raises(ArtifactError, match=f"replaced during the run \\(model_id {first}, now {second}\\)"):
        scoring_run._same_model(r)
    with pytest.raises(
        ArtifactError, match=f"no longer the one this run scores with \\(model_id {first}, now {second}"
    ):
        predictor.Predictor(cfg, model_id=first)
