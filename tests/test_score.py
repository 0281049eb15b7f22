"""Batch scoring end to end: S3 server in/out, incremental re-runs, new model version, bad files,
manifests, and kill-and-rerun exactly-once (SIGKILL of the job process at several points)."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import PY, ROOT, job_env, kill_tree, last_json, run_job, upload_tree
from PIL import Image, ImageOps

from crackscale import query, storage
from crackscale.config.loader import ConfigError
from crackscale.config.score import ScoreConfig
from crackscale.imaging import tfdecode
from crackscale.scoring import blocks, manifests, pipeline
from crackscale.scoring import decode as scoring_decode
from crackscale.scoring import keys as scoring_keys
from crackscale.scoring import listing as scoring_listing
from crackscale.scoring import run as scoring_run


def bad_files() -> dict[str, bytes]:
    """Every kind of file that must become an error row, with the error prefix it must get."""
    good = io.BytesIO()
    Image.new("RGB", (80, 60), (120, 130, 140)).save(good, "JPEG")
    g = good.getvalue()
    gif = io.BytesIO()
    Image.new("RGB", (20, 20)).save(gif, "GIF")
    return {
        "truncated.jpg": g[: len(g) // 2],
        "corrupt.jpg": g[:200] + bytes(range(256)) * 4,
        "empty.jpg": b"",
        "notes.jpg": b"inspection notes, not an image\n",
        "animated.jpg": gif.getvalue(),
    }


EXPECTED_ERRORS = {
    "truncated.jpg": "decode:",
    "corrupt.jpg": "decode:",
    "empty.jpg": "empty file",
    "notes.jpg": "decode: not an image",
    "animated.jpg": "unsupported: format GIF",
}


def read_scores(output: str):
    return query.open_scores(output).to_table()


def test_decode_matches_training_and_flags_bad_files(synth_data):
    import tensorflow as tf

    from crackscale.imaging import tfdecode

    cfg = ScoreConfig(max_pixels=1_000_000)
    blob = next((synth_data / "Positive").glob("*.jpg")).read_bytes()
    # exactly what training feeds the model: tfdecode.decode, rounded to uint8 as tfdata.tf_dataset does,
    # with the artifact's resize (artifacts without "resize_antialias" were trained antialiased)
    assert tfdecode.resize_antialias({}) is True and tfdecode.resize_antialias({"resize_antialias": False}) is False
    imgs = {}
    for aa in (False, True):
        img, err = scoring_decode.decode_image(blob, "a.jpg", 64, cfg, aa)
        assert err == "" and img.dtype == np.uint8 and img.shape == (64, 64, 3)
        assert np.array_equal(img, tf.cast(tf.round(tfdecode.decode(blob, 64, aa)), tf.uint8).numpy())
        imgs[aa] = img
    assert not np.array_equal(imgs[False], imgs[True])  # the two resizes differ: the key matters
    for name, content in bad_files().items():
        img, err = scoring_decode.decode_image(content, name, 64, cfg)
        assert img is None and err.startswith(EXPECTED_ERRORS[name]), (name, err)
    assert scoring_decode.decode_image(blob, "x.heic", 64, cfg)[1] == "unsupported: extension .heic"
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(big, "PNG")
    assert scoring_decode.decode_image(big.getvalue(), "big.png", 64, cfg)[1].startswith("too large: 1200x1000")
    # EXIF orientation is applied (camera images), as PIL.ImageOps.exif_transpose does
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        im = Image.fromarray(arr)
        exif = im.getexif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        im.save(buf, "PNG", exif=exif.tobytes())
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
        want = tf.cast(tf.round(tf.image.resize(upright, (32, 32))), tf.uint8).numpy()
        got, err = scoring_decode.decode_image(buf.getvalue(), "r.png", 32, cfg)
        assert err == "" and np.array_equal(got, want), orientation


def test_decode_batch_is_per_image_decode_and_isolates_bad_files(synth_data, tmp_path):
    """One batched decode call gives the same pixels as decoding each image; a corrupt body in the
    batch gets its error row and its neighbours are still decoded."""
    cfg = ScoreConfig(max_pixels=1_000_000)
    good = sorted((synth_data / "Positive").glob("*.jpg"))[:6] + sorted((synth_data / "Negative").glob("*.jpg"))[:6]
    for name, content in bad_files().items():
        (tmp_path / name).write_bytes(content)
    for files in (good, good[:6] + sorted(tmp_path.iterdir()) + good[6:]):
        batch = {"uri": np.array([str(f) for f in files], dtype=object), "size": np.full(len(files), -1)}
        for aa in (False, True):
            out = scoring_decode.decode_batch(batch, 48, cfg, aa)
            for f, img, err in zip(files, out["image"], out["error"]):
                want, want_err = scoring_decode.decode_image(f.read_bytes(), f.name, 48, cfg, aa)
                assert err == want_err, f
                assert np.array_equal(img, want) if want is not None else not img.any(), f
                if f.name in EXPECTED_ERRORS:
                    assert err.startswith(EXPECTED_ERRORS[f.name]) and len(err) > len("decode: ")
        assert list(out["size"]) == [f.stat().st_size for f in files]


def score_job(model: str, inp: str, out: str, cache: Path, *extra: str) -> list[str]:
    return [
        "jobs/score.py",
        "--model",
        model,
        "--input",
        inp,
        "--output",
        out,
        "--set",
        "batch_size=8",
        "--set",
        "block_size=8",
        "--set",
        "chunk_size=8",
        "--set",
        f"cache_dir={cache}",
        *extra,
    ]


@pytest.mark.slow
def test_s3_incremental_and_new_model(s3_server, s3_bucket, synth_data, model_artifact, model_artifact_v2, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    pos = tmp_path / "night1" / "site-a"
    pos.mkdir(parents=True)
    for p in (
        sorted((synth_data / "Positive").glob("*.jpg"))[:10] + sorted((synth_data / "Negative").glob("*.jpg"))[:10]
    ):
        (pos / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    for name, content in bad_files().items():
        (pos / name).write_bytes(content)
    (pos / "readme.txt").write_text("not listed: extension filter")
    upload_tree(s3_server, tmp_path / "night1", s3_bucket, "images")
    inp, out = f"s3://{s3_bucket}/images/", f"s3://{s3_bucket}/scores"

    r = run_job(score_job(model_artifact["uri"], inp, out, tmp_path / "cache"), env=job_env())
    assert r.returncode == 0, r.stderr[-3000:]
    s = last_json(r.stdout)
    assert (s["listed"], s["already_scored"], s["scored"], s["failed"]) == (25, 0, 20, 5)
    assert s["runtime"] == "litert" and s["chunks"] == 4
    t = read_scores(out)
    assert t.num_rows == 25 and len(set(t["uri"].to_pylist())) == 25
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in t.to_pylist()}
    for name, prefix in EXPECTED_ERRORS.items():
        assert rows[name]["error"].startswith(prefix) and rows[name]["crack_probability"] is None
    good = [r for r in rows.values() if r["error"] is None]
    assert len(good) == 20 and all(0 <= r["crack_probability"] <= 1 for r in good)
    assert all(r["crack"] == (r["crack_probability"] >= 0.5) for r in good)
    assert len({round(r["crack_probability"], 4) for r in good}) > 5  # really scored, not a constant
    assert {r["model_id"] for r in rows.values()} == {model_artifact["meta"]["model_sha256"][:16]}
    head = s3.head_object(Bucket=s3_bucket, Key="images/site-a/" + good[0]["uri"].rsplit("/", 1)[1])
    assert good[0]["etag"] == head["ETag"].strip('"') and good[0]["size"] == head["ContentLength"]
    assert storage.exists(s["summary_uri"])
    # its report, built in the job's own process from the artifact's heatmap export
    assert s["report"] == f"{out}/_reports/{s['run_id']}/index.html"
    assert "No heatmaps" not in storage.read_text(s["report"]) and storage.exists(
        f"{out}/_reports/{s['run_id']}/top/000.png"
    )
    # DuckDB over the same S3 outputs
    con = query.connect(out)
    assert query.sql(con, "SELECT count(*) AS n, count(error) AS f FROM scores").to_pylist() == [{"n": 25, "f": 5}]

    # next night: 3 new uploads → only they are scored
    new = tmp_path / "night2" / "site-b"
    new.mkdir(parents=True)
    for p in sorted((synth_data / "Positive").glob("*.jpg"))[20:23]:
        (new / p.name).write_bytes(p.read_bytes())
    upload_tree(s3_server, tmp_path / "night2", s3_bucket, "images")
    r = run_job(
        score_job(model_artifact["uri"], inp, out, tmp_path / "cache", "--set", "run_date=2030-01-02"), env=job_env()
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = last_json(r.stdout)
    assert (s["listed"], s["already_scored"], s["scored"], s["failed"]) == (28, 25, 3, 0)
    t = read_scores(out)
    assert t.num_rows == 28 and len(set(t["uri"].to_pylist())) == 28
    assert (
        sorted(u.rsplit("/", 2)[1] for u in t.filter(pads.field("run_date") == "2030-01-02")["uri"].to_pylist())
        == ["site-b"] * 3
    )

    # a new model version rescored everything; one row per (image, model)
    r = run_job(score_job(model_artifact_v2["uri"], inp, out, tmp_path / "cache"), env=job_env())
    assert r.returncode == 0, r.stderr[-3000:]
    s = last_json(r.stdout)
    assert (s["already_scored"], s["scored"], s["failed"]) == (0, 23, 5)
    t = read_scores(out)
    pairs = list(zip(t["uri"].to_pylist(), t["model_id"].to_pylist()))
    assert len(pairs) == 56 and len(set(pairs)) == 56
    assert len(set(t["model_id"].to_pylist())) == 2


def _parquet_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.parquet") if "_staging" not in p.parts]


def _kill_predictor(proc: subprocess.Popen) -> bool:
    import psutil

    for k in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "Predictor" in " ".join(k.cmdline()):
                k.kill()
                return True
        except psutil.Error:
            pass
    return False


@pytest.mark.slow
def test_kill_and_rerun_exactly_once(synth_data, model_artifact, tmp_path):
    images = tmp_path / "images"
    n = 0
    for cls in ("Positive", "Negative"):
        for p in sorted((synth_data / cls).glob("*.jpg"))[:60]:
            d = images / cls / f"batch{n % 3}"
            d.mkdir(parents=True, exist_ok=True)
            (d / p.name).write_bytes(p.read_bytes())
            n += 1
    (images / "Positive" / "bad.jpg").write_bytes(b"garbage")
    total = n + 1
    out = tmp_path / "scores"
    # 31 chunks of 4 images, each committed as one file
    cmd = score_job(
        model_artifact["uri"],
        str(images),
        str(out),
        tmp_path / "cache",
        "--set",
        "chunk_size=4",
        "--set",
        "batch_size=4",
        "--set",
        "block_size=4",
        # a killed run keeps its lease until it expires: the next run waits that long, then takes over
        "--set",
        "lease_ttl_s=3",
        "--wait",
    )
    # kill points: after the 1st committed file, after more files, and at a fixed delay from start
    # (which may land before anything is committed, during Ray/actor start-up)
    killed_mid_run = 0
    for kind, arg in (("files", 1), ("files", 6), ("delay", 4.0), ("worker", 2)):
        before = len(_parquet_files(out))
        log = tmp_path / f"{kind}-{arg}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([PY, *cmd], cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=f)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 600:
            if kind == "files" and len(_parquet_files(out)) >= before + arg:
                break
            if kind == "delay" and time.monotonic() - t0 >= arg:
                break
            if kind == "worker" and len(_parquet_files(out)) >= before + arg:
                # SIGKILL the model actor's process: the attempt fails and a second one finishes the run
                assert _kill_predictor(proc), "no Predictor actor process found to kill"
                killed_mid_run += 1
                proc.wait(timeout=600)
                break
            time.sleep(0.005)
        finished = proc.poll() is not None
        if kind == "worker":
            assert proc.returncode == 0, (
                "the run did not survive the loss of a model actor:\n" + log.read_text()[-4000:]
            )
            continue
        kill_tree(proc)
        files = _parquet_files(out)
        if not finished and not list((out / "_runs").glob("*.json")):
            killed_mid_run += 1
        # whatever is visible is whole: every file reads, no key twice
        if files:
            t = read_scores(str(out))
            assert len(set(t["uri"].to_pylist())) == t.num_rows
    assert killed_mid_run >= 3, "the job finished before it could be killed: the test proved nothing"
    r = run_job(cmd, env=job_env())
    assert r.returncode == 0, r.stderr[-3000:]
    s = last_json(r.stdout)
    assert s["listed"] == total and s["already_scored"] + s["scored"] + s["failed"] == total
    t = read_scores(str(out))
    uris = t["uri"].to_pylist()
    assert len(uris) == total and len(set(uris)) == total
    assert set(uris) == {str(p) for p in images.rglob("*.jpg")}
    assert t.filter(pads.field("error").is_valid())["uri"].to_pylist() == [str(images / "Positive" / "bad.jpg")]
    # and once more: nothing left to do
    r = run_job(cmd, env=job_env())
    s = last_json(r.stdout)
    assert (s["already_scored"], s["scored"], s["failed"]) == (total, 0, 0)


@pytest.mark.parametrize("decode", ["actor", "tasks"])
def test_manifest_in_process(ray_local, synth_data, model_artifact, tmp_path, decode):
    """scoring_run.run() in-process on a local Ray; input from a .txt manifest that also names an
    unsupported file, a missing object and a duplicate line. Images decoded in the model actors
    (the CPU default) or in tasks before them (the GPU default)."""
    imgs = sorted((synth_data / "Negative").glob("*.jpg"))[:6]
    other = tmp_path / "scan.heic"
    other.write_bytes(b"II*\x00")
    lines = [str(p) for p in imgs] + [str(imgs[0]), str(other), str(tmp_path / "gone.jpg")]
    manifest = tmp_path / "tonight.txt"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = ScoreConfig(
        model=model_artifact["uri"],
        input=str(manifest),
        output=str(tmp_path / "out"),
        batch_size=4,
        block_size=4,
        chunk_size=4,
        runtime="tf",
        cache_dir=str(tmp_path / "c"),
        decode=decode,
    )
    assert pipeline.decode_in_actor(cfg) == (decode == "actor")
    s = scoring_run.run(cfg)
    assert (s["listed"], s["scored"], s["failed"], s["runtime"]) == (8, 6, 2, "tf")
    # start-up ends with the first result batch (at most one block): its images are counted
    assert 0 < s["startup_s"] <= s["duration_s"] and 1 <= s["startup_images"] <= cfg.block_size
    rows = {r["uri"]: r for r in read_scores(cfg.output).to_pylist()}
    assert rows[str(other)]["error"] == "unsupported: extension .heic"
    assert rows[str(tmp_path / "gone.jpg")]["error"] == "read: not found"
    # a plain manifest carries no metadata: size comes from the bytes read, mtime stays unknown
    assert rows[str(imgs[0])]["size"] == imgs[0].stat().st_size and rows[str(imgs[0])]["mtime"] is None
    with pytest.raises(Exception, match="config key 'output' is required"):
        scoring_run.run(ScoreConfig(model=cfg.model, input=cfg.input))


@pytest.mark.slow
def test_scoring_starts_while_the_listing_goes_on(ray_local, synth_data, model_artifact, tmp_path, monkeypatch):
    """A slow listing (0.25 s per object here): with ``first_wave_s`` 1 scoring starts on the chunks
    listed by then, and a later wave takes the chunks listed meanwhile; every image once. A listing
    that fails part-way: the chunks listed before the failure are committed, the run raises the
    listing's error, and a re-run scores the rest, each image once."""
    import dataclasses
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    for p in sorted(synth_data.rglob("*.jpg"))[:16]:
        shutil.copy(p, src / f"{p.parent.name}-{p.name}")
    real = scoring_listing.list_input

    def slow(cfg):
        for o in real(cfg):
            time.sleep(0.25)
            yield o

    monkeypatch.setattr(scoring_listing, "list_input", slow)
    cfg = ScoreConfig(
        model=model_artifact["uri"],
        input=str(src),
        output=str(tmp_path / "out"),
        batch_size=4,
        block_size=4,
        chunk_size=4,
        first_wave_s=1.0,
        cache_dir=str(tmp_path / "c"),
    )
    s = scoring_run.run(cfg)
    assert s["waves"] >= 2 and s["attempts"] == s["waves"], s
    assert (s["listed"], s["scored"], s["failed"], s["chunks"]) == (16, 16, 0, 4), s
    uris = read_scores(cfg.output).column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == 16

    def failing(cfg):
        for i, o in enumerate(real(cfg)):
            if i == 9:
                raise storage.StorageError(f"cannot list {cfg.input}: connection reset")
            yield o

    monkeypatch.setattr(scoring_listing, "list_input", failing)
    cfg = dataclasses.replace(cfg, output=str(tmp_path / "out2"), first_wave_s=0.0)
    with pytest.raises(storage.StorageError, match="connection reset"):
        scoring_run.run(cfg)
    assert read_scores(cfg.output).num_rows == 8  # two whole chunks; the third was cut by the failure
    monkeypatch.setattr(scoring_listing, "list_input", real)
    s = scoring_run.run(cfg)
    assert (s["already_scored"], s["scored"]) == (8, 8)
    uris = read_scores(cfg.output).column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == 16


def test_manifests_are_streamed_and_keep_the_first_of_repeated_keys(tmp_path, monkeypatch):
    """.txt, .csv and .parquet manifests give their objects in order, each key once (the first),
    with size and etag where given. They are read a block at a time: 7-byte blocks of the .txt and
    2-row batches of the .parquet here, so lines straddle blocks. A manifest without a ``uri`` column
    is a ConfigError, a missing one a StorageError."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    monkeypatch.setattr(manifests, "MANIFEST_BLOCK", 7)
    monkeypatch.setattr(manifests, "MANIFEST_BATCH", 2)
    uris = [f"s3://bucket/site-{i % 3}/img-{i}.jpg" for i in range(9)]
    txt = tmp_path / "tonight.txt"
    txt.write_bytes(
        (
            "# tonight's uploads\r\n"
            + "\r\n".join(uris[:4])
            + "\n\n  "
            + uris[2]
            + "  \n"
            + "\n".join(uris[4:])
            + "\n"
            + uris[0]
        ).encode()
    )
    table = pa.table(
        {
            "uri": uris[:5] + [uris[1]] + uris[5:],
            "size": list(range(10, 15)) + [99] + list(range(15, 19)),
            "etag": [f"e{i}" for i in range(5)] + ["dup"] + [f"e{i}" for i in range(5, 9)],
        }
    )
    pcsv.write_csv(table, tmp_path / "tonight.csv")
    pq.write_table(table, tmp_path / "tonight.parquet", row_group_size=3)
    for name in ("tonight.txt", "tonight.csv", "tonight.parquet"):
        got = list(scoring_listing.list_input(ScoreConfig(input=str(tmp_path / name))))
        assert [o["uri"] for o in got] == uris, name
        if name != "tonight.txt":
            assert [o["size"] for o in got] == list(range(10, 19)) and got[5]["etag"] == "e5", name
        else:
            assert {o["size"] for o in got} == {-1} and {o["etag"] for o in got} == {""}
    pq.write_table(pa.table({"key": uris}), tmp_path / "bad.parquet")
    pcsv.write_csv(pa.table({"key": uris}), tmp_path / "bad.csv")
    for name in ("bad.parquet", "bad.csv"):
        with pytest.raises(ConfigError, match=f"manifest .*{name} has no 'uri' column"):
            list(scoring_listing.list_input(ScoreConfig(input=str(tmp_path / name))))
    with pytest.raises(storage.StorageError, match="not found: .*gone.txt"):
        list(scoring_listing.list_input(ScoreConfig(input=str(tmp_path / "gone.txt"))))


def test_key_set_finds_repeats_before_and_after_merging():
    ks = scoring_keys.KeySet(merge_at=3)
    keys = [scoring_keys.key_hash(f"s3://b/{i}.jpg") for i in range(10)]
    assert ks.add_many(keys[:4] + [keys[0]]) == [True] * 4 + [False]  # a repeat within one call
    assert len(ks) == 4  # merged into the sorted array
    assert ks.add_many(keys) == [False] * 4 + [True] * 6 and len(ks) == 10
    assert ks.add_many(keys[::-1]) == [False] * 10 and len(ks) == 10
    assert ks.add_many([scoring_keys.key_hash("s3://b/new.jpg")]) == [True] and len(ks) == 11


def test_committed_key_lookup_survives_hashes_ending_in_nul():
    """numpy's bytes dtype strips trailing NULs: a key hash ending in a zero byte (about 1 in 256)
    must still be found, or its image would be scored twice. Checked in the merged arrays and before
    merging."""
    from crackscale.scoring.keys import KeySet, key_hash

    uris = [f"s3://b/site/{i:06d}.jpg" for i in range(3000)]
    hashes = [key_hash(u) for u in uris]
    assert any(h[15] == 0 for h in hashes)  # the case the sentinel byte exists for is present
    for merge_at in (1000, 10_000):  # all merged / none merged
        done = KeySet(merge_at=merge_at)
        assert all(done.add_many(hashes)) and len(done) == 3000
        assert all(h in done for h in hashes) and not any(done.add_many(hashes))
        assert not any(key_hash(f"s3://b/other/{i}.jpg") in done for i in range(500))
    done = KeySet.of_distinct(iter([hashes[:1000], [], hashes[1000:]]))  # how committed() builds it
    assert len(done) == 3000 and all(h in done for h in hashes)
    assert not any(key_hash(f"s3://b/other/{i}.jpg") in done for i in range(500))


def test_cpu_layout_is_one_single_threaded_actor_per_core(ray_local):
    """num_actors / threads 0 on CPU: with decode: actor, one actor per actor_cpus Ray CPUs, sharing
    the CPUs as threads; with decode: tasks, one actor per node on all its cores; set values win."""

    def layout(**kw):
        return pipeline.layout(ScoreConfig(**kw))

    assert ray_local.cluster_resources()["CPU"] == 4
    assert layout() == (4, 1)
    assert layout(actor_cpus=2.0) == (2, 2)
    assert layout(num_actors=1) == (1, 4)
    assert layout(num_actors=3, threads=2) == (3, 2)
    assert layout(decode="tasks") == (1, 0)
    with pytest.raises(ConfigError, match="'use_gpu' is true but the Ray cluster has no GPUs"):
        layout(use_gpu=True)


def test_listed_blocks_become_a_dataset_without_metadata_tasks(ray_local, monkeypatch):
    """The listing computes each block's Ray Data metadata itself, and ``blocks.dataset`` builds the
    Dataset from it: the rows, counts and schema of ``ray.data.from_arrow_refs``, without its remote
    metadata task per block (with the pinned Ray: an upgrade that moves its internals fails here)."""
    import ray

    tables = [
        pa.table(
            {"uri": [f"/in/{b}-{i}.jpg" for i in range(n)], "chunk": ["c"] * n, "size": pa.array(range(n), pa.int64())}
        )
        for b, n in enumerate((3, 5, 1))
    ]
    listed = [(ray.put(t), blocks.block_metadata(t)) for t in tables]
    assert all(m is not None and m.metadata.num_rows == t.num_rows for (_, m), t in zip(listed, tables))
    expected = ray.data.from_arrow_refs([r for r, _ in listed])

    def no_tasks(*a, **k):
        raise AssertionError("from_arrow_refs runs a metadata task per block")

    monkeypatch.setattr(ray.data, "from_arrow_refs", no_tasks)
    ds = blocks.dataset(listed)
    assert ds.count() == 9 and ds.num_blocks() == 3 and ds.schema() == expected.schema()
    assert ds.take_all() == expected.take_all()
    assert ds.map_batches(lambda b: {"n": [len(b["uri"])]}, batch_size=None).sum("n") == 9


def test_actor_calls_overlap_reads_only_for_objects_on_s3(ray_local, tmp_path):
    """``actor_calls`` 0: two calls at once per model actor when the listing met an S3 object, one
    for local files; a set value wins. The listing records whether it met one."""
    assert pipeline.actor_calls(ScoreConfig(), remote=False) == 1
    assert pipeline.actor_calls(ScoreConfig(), remote=True) == 2
    assert pipeline.actor_calls(ScoreConfig(actor_calls=3), remote=False) == 3
    with pytest.raises(ConfigError, match="'actor_calls' must be >= 0"):
        ScoreConfig(actor_calls=-1).validate()
    (tmp_path / "a.jpg").write_bytes(b"x")
    for lines, remote in (([str(tmp_path / "a.jpg")], False), ([str(tmp_path / "a.jpg"), "s3://b/k.jpg"], True)):
        (tmp_path / "m.txt").write_text("\n".join(lines))
        listing = scoring_listing.Listing(
            ScoreConfig(input=str(tmp_path / "m.txt"), chunk_size=1), scoring_keys.KeySet()
        )
        listing.next_wave(set(), time.time() + 600)  # waits for the listing's end
        assert listing.error is None and listing.remote is remote and len(listing.sizes) == len(lines)


@pytest.mark.slow
def test_benchmark_score_job_prints_rows_and_ratios(synth_data, tmp_path):
    """jobs/benchmark_score.py end to end at tiny N (the 20,000-image run is a manual benchmark),
    including its jobs on a cluster it starts with cluster/local/cluster.sh and stops."""
    r = run_job(
        [
            "jobs/benchmark_score.py",
            "--data",
            str(synth_data),
            "--n",
            "600",
            "--image-size",
            "64",
            "--alpha",
            "0.35",
            "--seconds",
            "1",
            "--small",
            "200",
            "--batches",
            "4",
            "--skip",
            "s3,tasks",
            "--chunk-size",
            "100",
            "--photos",
            "1",
            "--photo-sides",
            "1000",
            "--workdir",
            str(tmp_path),
        ],
        env=job_env(),
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    rows, ratios = out["rows"], out["ratios"]
    a = rows["(a) model only, LiteRT fp32, preloaded tensors (fastest layout, mean of before/after)"]
    a8 = rows["(a) model only, LiteRT int8, preloaded tensors (fastest layout, mean of before/after)"]
    # (b): the second of two jobs on a `ray start --head` cluster that the benchmark started and stopped
    assert out["b"] == "(b) crackscale local → Parquet, N=600, on a running cluster, next job"
    b, first = rows[out["b"]], rows["(b) crackscale local → Parquet, N=600, on a running cluster, first job"]
    private = rows["(b) crackscale local → Parquet, N=600"]  # a Ray of its own, int8 (the default --runtime)
    small = rows["(b) crackscale local → Parquet, N=200"]
    c = rows["(c) image_dataset_from_directory + predict, N=600"]
    assert first["img_s"] > 0 and private["img_s"] > 0 and private["peak_rss_mib"] > 100
    assert (private["runtime"], small["runtime"]) == ("litert-int8", "litert-int8")
    assert ratios["b_private_ray_over_a_wall"] == pytest.approx(private["img_s"] / a8["img_s"])
    assert ratios["int8_over_fp32_model_only"] == pytest.approx(a8["img_s"] / a["img_s"])
    for ceiling in (a, a8):
        assert ceiling["img_s"] == pytest.approx((ceiling["before"] + ceiling["after"]) / 2) and ceiling["before"] > 0
        # the fastest of the swept layouts: 2 layouts × the batch sizes asked for, each measured
        for sweep, fastest, layout in zip(ceiling["sweep"], (ceiling["before"], ceiling["after"]), ceiling["layout"]):
            assert len(sweep) == 2 and min(sweep.values()) > 0 and fastest == max(sweep.values()) == sweep[layout]
    assert b["img_s"] > 0 and b["startup_s"] > 0 and b["peak_rss_mib"] > 100 and c["img_s"] > 0
    # 6 chunks of 100 (decoded in two blocks): a steady rate, over the images after the first
    # result batch only
    assert b["steady_img_s"] > 0 and b["wall_s"] > b["startup_s"]
    assert ratios["b_over_c_wall"] == pytest.approx(b["img_s"] / c["img_s"])
    # whole processes: the marginal rate and fixed cost come from the two private-Ray runs' walls
    # (at this tiny N the two walls may be too close to tell apart: then it says so)
    w = out["whole_process"]
    # the bound of decode + model on the same cores, and the floor of a private Ray's start + stop
    dec = rows["(a'') decode only, JPEG bytes in memory → model input, one process per core"]
    floor = rows["(f) a process that only starts and stops a private Ray"]
    assert dec["img_s"] == pytest.approx((dec["before"] + dec["after"]) / 2) and dec["before"] > 0
    assert w["bound_img_s"] == pytest.approx(1 / (1 / a8["img_s"] + 1 / dec["img_s"]))
    assert ratios["decode_and_model_bound_over_model_only"] == pytest.approx(w["bound_img_s"] / a8["img_s"])
    assert floor["process_s"] > floor["startup_s"] > 0 and w["floor_s"] == floor["process_s"]
    assert ratios["best_possible_process_over_c_process"] == pytest.approx(
        c["process_s"] / (floor["process_s"] + 600 / w["bound_img_s"])
    )
    if private["process_s"] > small["process_s"]:
        marginal = 400 / (private["process_s"] - small["process_s"])
        assert w["marginal_img_s"] == pytest.approx(marginal)
        assert w["fixed_s"] == pytest.approx(small["process_s"] - 200 / marginal)
        assert "whole process, litert-int8: marginal" in r.stdout
    else:
        assert "marginal_img_s" not in w and "whole process: not measurable" in r.stdout
    assert private["process_s"] > private["wall_s"] and c["process_s"] > c["wall_s"]
    assert ratios["process_over_c_process"] == pytest.approx(private["process_img_s"] / c["process_img_s"])
    assert "| (b) crackscale local → Parquet, N=600 |" in r.stdout
    assert "| (b) crackscale local → Parquet, N=600, on a running cluster, next job |" in r.stdout
    # whole photos: tiles/s of one stitched 16×12 photo beside the same 192 crops as files, and an
    # actor's memory growth for a 1000 × 1250 photo
    photos = out["photos"]
    tiled, crops = photos["tiles of stitched photos"], photos["the same crops as files"]
    assert (tiled["images"], tiled["tiles"], crops["images"], crops["tiles"]) == (1, 192, 192, 192)
    assert ratios["tiles_over_crops_wall"] == pytest.approx(tiled["img_s"] / crops["img_s"])
    assert ratios["tiles_over_crops_wall"] > 0
    (memory,) = [v for k, v in photos.items() if k.startswith("actor memory")]
    assert memory["mp"] == pytest.approx(1.25, abs=0.06) and memory["tiles"] == 5 * 6 and memory["error"] == ""


@pytest.mark.slow
def test_a_worker_whose_tensorflow_import_was_cut_short_exits_for_a_retry():
    """Ray cancels a failed attempt's decode tasks (KeyboardInterrupt) and reuses their processes;
    one cancelled during ``import tensorflow`` may never import it again. Such a process must end
    itself (Ray Data then retries the task in a new worker), not fail every later task. The cut is
    made at increasing delays (shares of a whole import's time), one process each, until one lands
    where a re-import fails. A cut that lands inside a pybind11 extension's initialisation comes out
    as ``ImportError: initialization failed`` instead (as a KeyboardInterrupt would in Ray)."""
    code = """
import signal, sys
from crackscale.imaging import tfdecode
from crackscale.scoring import decode as scoring_decode

class Cut(BaseException):
    pass

def cut(*_):
    raise Cut()

signal.signal(signal.SIGALRM, cut)
signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
try:
    import tensorflow
except (Cut, ImportError):  # a cut inside a C extension's init surfaces as "initialization failed"
    pass
signal.setitimer(signal.ITIMER_REAL, 0)
if not tfdecode.tf_import_cut_short():
    print("not cut short")
    sys.exit(0)
tfdecode.import_tf_or_exit()
print("re-import worked")
"""
    # cut points spread over how long a whole import takes on this machine now
    t0 = time.monotonic()
    full = subprocess.run([PY, "-c", code, "1000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert full.returncode == 0 and "not cut short" in full.stdout, full.stdout + full.stderr[-3000:]
    seen = []
    for i in range(30):
        r = subprocess.run(
            [PY, "-c", code, str(took * (0.1 + 0.03 * i))], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        if r.returncode == tfdecode.TF_IMPORT_CUT_SHORT_EXIT:
            assert "TensorFlow import was cut short" in r.stderr and "re-import worked" not in r.stdout
            break
        # otherwise the process must carry on: cut where a re-import still works, or not at all
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        seen.append(r.stdout.strip())
    else:
        raise AssertionError(f"no cut point made a re-import fail: {seen}")


def test_a_damaged_output_file_fails_closed_and_repair_sets_it_aside(ray_local, synth_data, model_artifact, tmp_path):
    """A zero-byte part file is never read as "nothing committed" (that would score every image
    again): the run stops with one line naming the file and the repair command, exit 2.
    ``crackscale repair`` moves it to ``_quarantine/``; the next run scores its images again, each
    image once."""
    inp = tmp_path / "in"
    inp.mkdir()
    for p in sorted((synth_data / "Positive").glob("*.jpg"))[:12]:
        (inp / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    cfg = ScoreConfig(
        model=model_artifact["uri"],
        input=str(inp),
        output=str(out),
        chunk_size=4,
        block_size=4,
        batch_size=4,
        cache_dir=str(tmp_path / "c"),
    )
    assert scoring_run.run(cfg)["chunks"] == 3
    part = sorted(p for p in out.rglob("part-*.parquet") if "_staging" not in p.parts)[0]
    part.write_bytes(b"")
    cmd = ["jobs/score.py", "--model", cfg.model, "--input", cfg.input, "--output", cfg.output]
    r = run_job([*cmd, "--set", "chunk_size=4", "--set", f"cache_dir={tmp_path / 'c'}"], env=job_env(), timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"damaged output file {part}" in errors[0] and f"crackscale repair --output {out}" in errors[0]
    rep = run_job(["-m", "crackscale.cli", "repair", "--output", str(out)], timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    moved = last_json(rep.stdout)["quarantined"]
    assert [m["file"] for m in moved] == [str(part)] and not part.exists()
    assert (out / "_quarantine" / part.relative_to(out)).is_file()
    s = scoring_run.run(cfg)
    assert (s["already_scored"], s["scored"]) == (8, 4), s
    uris = read_scores(str(out))["uri"].to_pylist()
    assert len(uris) == len(set(uris)) == 12


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_changed_image_is_scored_again_as_a_new_version(
    where, ray_local, s3_server, s3_bucket, synth_data, model_artifact, tmp_path
):
    """An image overwritten at the same URI (new ETag; locally a new size and mtime) is scored
    again; both rows stay, with their etag/size/mtime, and ``query`` shows the latest version unless
    asked for all of them."""
    import boto3

    files = sorted((synth_data / "Negative").glob("*.jpg"))[:6]
    other = sorted((synth_data / "Positive").glob("*.jpg"))[0].read_bytes()
    s3 = boto3.client("s3", endpoint_url=s3_server)
    if where == "s3":
        for f in files:
            s3.put_object(Bucket=s3_bucket, Key=f"images/{f.name}", Body=f.read_bytes())
        inp, out, changed = (
            f"s3://{s3_bucket}/images/",
            f"s3://{s3_bucket}/scores",
            f"s3://{s3_bucket}/images/{files[2].name}",
        )
    else:
        (tmp_path / "in").mkdir()
        for f in files:
            (tmp_path / "in" / f.name).write_bytes(f.read_bytes())
        inp, out, changed = str(tmp_path / "in"), str(tmp_path / "scores"), str(tmp_path / "in" / files[2].name)
    from crackscale.config.storage import StorageConfig

    store = StorageConfig(s3_endpoint=s3_server)
    cfg = ScoreConfig(model=model_artifact["uri"], input=inp, output=out, cache_dir=str(tmp_path / "c"), storage=store)
    assert scoring_run.run(cfg)["scored"] == 6
    if where == "s3":
        s3.put_object(Bucket=s3_bucket, Key=f"images/{files[2].name}", Body=other)
    else:
        Path(changed).write_bytes(other)
        os.utime(changed, (time.time() + 10, time.time() + 10))
    s = scoring_run.run(dataclasses.replace(cfg, run_date="2030-01-02"))
    assert (s["already_scored"], s["scored"]) == (5, 1), s
    assert scoring_run.run(cfg)["scored"] == 0  # and then nothing more
    latest = query.connect(out, store).sql("SELECT uri, run_date FROM scores ORDER BY uri").fetchall()
    assert len(latest) == 6 and dict(latest)[changed] == "2030-01-02"
    rows = (
        query.connect(out, store, all_versions=True)
        .sql("SELECT etag, size, CAST(mtime AS VARCHAR) FROM scores WHERE uri = ? ORDER BY scored_at", params=[changed])
        .fetchall()
    )
    assert len(rows) == 2 and rows[0] != rows[1]
    if where == "s3":
        assert rows[0][0] and rows[1][0] and rows[0][0] != rows[1][0]  # rows keep the ETag they scored
