"""Scan → dedup → grouped, stratified, reproducible split; clear errors for bad data."""

import shutil

import numpy as np
import pyarrow as pa
import pytest
from conftest import upload_tree

from crackscale import storage
from crackscale.config.storage import StorageConfig
from crackscale.config.train import TrainConfig
from crackscale.data import labelled


def _cfg(path, **kw):
    return TrainConfig(data=str(path), weights="none", group_size=5, **kw)


def test_dedup_groups_and_reproducible_split(synth_data, tmp_path):
    tree = tmp_path / "d"
    shutil.copytree(synth_data, tree)
    # byte-identical copies inside a class (as in the real data) and one across classes
    shutil.copy(tree / "Positive" / "00003.jpg", tree / "Positive" / "00977.jpg")
    shutil.copy(tree / "Negative" / "00010.jpg", tree / "Negative" / "00991.jpg")
    shutil.copy(tree / "Negative" / "00020.jpg", tree / "Positive" / "00990.jpg")
    (tree / "Positive" / "00998.jpg").write_bytes(b"<html>not an image</html>")
    cfg = _cfg(tree)
    p = labelled.scan(cfg, str(tree))
    assert p.stats["duplicates_dropped"] == 3
    assert p.stats["conflicting_labels_dropped"] == 1  # 00020 is in both classes: dropped
    assert p.stats["undecodable_dropped"] == 1
    assert p.stats["images"] == 300 - 1
    # the crop size the model learns from: the most common longer side (a 100 px image does not move it)
    assert p.stats["source_size"] == 227
    assert labelled.source_size([{"width": 227, "height": 227}] * 3 + [{"width": 100, "height": 80}]) == 227
    hashes = [r["sha256"] for r in p.manifest]
    assert len(hashes) == len(set(hashes))
    # whole groups per split: neighbouring numbers never straddle splits
    split_of_group = {}
    for r in p.manifest:
        assert split_of_group.setdefault(r["group"], r["split"]) == r["split"]
    # stratified: every split has both classes, sizes near the fractions
    for s in labelled.SPLITS:
        for c in cfg.class_names:
            assert p.stats["per_split"][s][c] > 0
    n = p.stats["images"]
    assert abs(len(p.images["val"]) / n - cfg.val_fraction) < 0.06
    assert abs(len(p.images["test"]) / n - cfg.test_fraction) < 0.06
    # reproducible; a different seed gives a different split
    assert labelled.scan(cfg, str(tree)).manifest_hash == p.manifest_hash
    assert labelled.scan(_cfg(tree, seed=1), str(tree)).manifest_hash != p.manifest_hash
    # labels: 1 = crack class, whatever the order of class_names
    assert {r["label"] for r in p.manifest if r["class"] == "Positive"} == {1}
    q = labelled.scan(_cfg(tree, class_names=("Positive", "Negative")), str(tree))
    assert {r["label"] for r in q.manifest if r["class"] == "Positive"} == {1}


def test_group_key():
    assert labelled.group_key("00049.jpg", r"(\d+)", 50) == labelled.group_key("00001.jpg", r"(\d+)", 50)
    assert labelled.group_key("00051.jpg", r"(\d+)", 50) != labelled.group_key("00050.jpg", r"(\d+)", 50)
    assert labelled.group_key("site7_photo3_crop9.jpg", r"(site\d+_photo\d+)", 50) == "site7_photo3"


def test_missing_path_and_empty_class(tmp_path, synth_data):
    with pytest.raises(labelled.DataError, match="data path not found: .*nope"):
        labelled.scan(_cfg(tmp_path / "nope"), str(tmp_path / "nope"))
    tree = tmp_path / "t"
    (tree / "Negative").mkdir(parents=True)
    (tree / "Positive").mkdir()
    shutil.copy(synth_data / "Negative" / "00001.jpg", tree / "Negative")
    with pytest.raises(labelled.DataError, match=r"class folder is empty: .*Positive"):
        labelled.scan(_cfg(tree), str(tree))
    with pytest.raises(labelled.DataError, match=r"class folder missing: .*Cracked"):
        labelled.scan(_cfg(tree, class_names=("Negative", "Cracked"), crack_class="Cracked"), str(tree))


def test_scan_from_s3(s3_server, s3_bucket, synth_data):
    n = upload_tree(s3_server, synth_data, s3_bucket, "train-data")
    uri = f"s3://{s3_bucket}/train-data"
    cfg = _cfg(uri, limit_per_class=40)
    p = labelled.scan(cfg, uri)
    assert p.stats["images"] == 80 and n == 300
    assert all(r["uri"].startswith(f"s3://{s3_bucket}/train-data/") for r in p.manifest)
    # the same images read locally give the same manifest hash (content-addressed)
    local = labelled.scan(_cfg(synth_data, limit_per_class=40), str(synth_data))
    assert local.manifest_hash == p.manifest_hash


def test_unreachable_endpoint_and_missing_bucket(s3_server):
    from conftest import free_port

    dead = StorageConfig(s3_endpoint=f"http://127.0.0.1:{free_port()}")
    cfg = TrainConfig(data="s3://b/x", storage=dead)
    with pytest.raises(storage.StorageError, match=r"cannot access s3://b/x \(endpoint http://127\.0\.0\.1:\d+\)"):
        labelled.scan(cfg, "s3://b/x")
    with pytest.raises(labelled.DataError, match="data path not found: s3://no-such-bucket/x"):
        labelled.scan(TrainConfig(data="s3://no-such-bucket/x"), "s3://no-such-bucket/x")


def test_ray_data_scan_gives_the_driver_scans_split(ray_local, s3_server, s3_bucket, synth_data, tmp_path, monkeypatch):
    """ingest: ray_data hashes and checks in Ray Data tasks and keeps small rows in the driver: the
    same files give the same manifest (rows, CSV, hash) and drop counts as labelled.scan, locally
    and from S3."""
    from crackscale.data import ingest

    # many hashing blocks and row batches, as with millions of files
    monkeypatch.setattr(ingest, "FACTS_BLOCK", (16, 16))
    monkeypatch.setattr(ingest, "ROW_BATCH", 7)

    tree = tmp_path / "d"
    shutil.copytree(synth_data, tree)
    shutil.copy(tree / "Positive" / "00003.jpg", tree / "Positive" / "00977.jpg")
    shutil.copy(tree / "Negative" / "00020.jpg", tree / "Positive" / "00990.jpg")
    (tree / "Positive" / "00998.jpg").write_bytes(b"<html>not an image</html>")
    (tree / "Negative" / "00999.jpg").write_bytes(b"<html>not an image</html>")  # the same bad bytes twice
    for seed in (42, 7):
        cfg = _cfg(tree, seed=seed)
        want, got = labelled.scan(cfg, str(tree)), ingest.scan(cfg, str(tree))
        assert got.manifest_hash == want.manifest_hash and got.stats == want.stats
        assert ingest.manifest_csv(got.table, got.source) == labelled.manifest_csv(want.manifest)
        assert "image" not in got.table.column_names and got.table.num_rows == want.stats["images"]
    assert got.stats["undecodable_dropped"] == 2 and got.stats["conflicting_labels_dropped"] == 1
    upload_tree(s3_server, tree, s3_bucket, "ingest")
    uri = f"s3://{s3_bucket}/ingest"
    remote = ingest.scan(_cfg(uri), uri)
    assert remote.manifest_hash == labelled.scan(_cfg(uri), uri).manifest_hash
    assert remote.table["uri"][0].as_py().startswith(f"s3://{s3_bucket}/ingest/")


def listed(uri: str, exts: tuple[str, ...]) -> list[str]:
    return [u for batch in storage.iter_uri_batches(uri, exts) for u in batch.to_pylist()]


def test_streamed_listing_keeps_the_sorted_order(s3_server, s3_bucket, tmp_path, monkeypatch):
    """storage.iter_uri_batches walks a folder (or S3 pages) at a time in exactly list_files' sorted-path
    order, which decides which of two identical files is kept."""
    tree = tmp_path / "t"
    for rel in ("b.jpg", "a/z.jpg", "a-b.jpg", "a/b/c.JPG", "ab.jpg", "a.jpg", "é.jpg", "a b.jpg", "x.txt", "A.jpg"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"x")
    exts = (".jpg",)
    monkeypatch.setattr(storage, "LIST_CHUNK", 3)  # a folder read in several arrow chunks
    want = [storage.uri_of(str(tree), f.path) for f in storage.list_files(str(tree), exts)]
    assert listed(str(tree), exts) == want and len(want) == 9
    upload_tree(s3_server, tree, s3_bucket, "walk")
    uri = f"s3://{s3_bucket}/walk"
    assert listed(uri, exts) == [storage.uri_of(uri, f.path) for f in storage.list_files(uri, exts)]


def test_digest_groups_are_exact_when_first_words_collide():
    """Dedupe sorts on each digest's first 8 bytes: digests that share those bytes but differ
    later, interleaved across chunks, still group exactly, each group in listing order; a value
    that is not a 32-byte digest is refused."""
    from crackscale.data.ingest import digest_groups

    rng = np.random.default_rng(0)
    for _ in range(100):
        base = [rng.bytes(32) for _ in range(5)]
        base += [base[0][:8] + rng.bytes(24), base[1][:8] + rng.bytes(24), base[0][:8] + rng.bytes(24)]
        values = [base[i] for i in rng.integers(0, len(base), rng.integers(0, 40))]
        cuts = sorted(set(rng.integers(0, len(values) + 1, 4).tolist()) | {0, len(values)})
        # each chunk a slice of a larger array, as filters and concatenations leave them
        pad = [rng.bytes(32)]
        chunks = [pa.array(pad + values[a:b] + pad, pa.binary()).slice(1, b - a) for a, b in zip(cuts, cuts[1:])]
        order, starts = digest_groups(pa.chunked_array(chunks, pa.binary()))
        want: dict[bytes, list[int]] = {}
        for i, v in enumerate(values):
            want.setdefault(v, []).append(i)
        got = [g.tolist() for g in np.split(order, starts[1:])] if values else []
        assert sorted(got) == sorted(want.values())
    with pytest.raises(ValueError, match="32-byte digest"):
        digest_groups(pa.chunked_array([pa.array([b"x" * 32, b"short"])]))
