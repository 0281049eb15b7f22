"""Training sources: crop trees and photo sets with masks → labelled tiles, split photo by photo,
de-duplicated across sources, weighted per epoch; the threshold that holds on every source; bad
input as one line."""

import csv
import io
import shutil

import numpy as np
import pytest
from conftest import run_job
from PIL import Image

from crackscale import model as M
from crackscale.config.loader import ConfigError, from_dict
from crackscale.config.train import SourceConfig, TrainConfig
from crackscale.data import labelled, sources
from crackscale.imaging import grid


def _cfg(data, **kw):
    base = {"data": data, "weights": "none", "group_size": 5, "source_size": 227}
    base.update(kw)
    return from_dict(TrainConfig, base)


def _photo_set(root, photos: dict[str, tuple[np.ndarray, np.ndarray]]):
    (root / "photos").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for stem, (img, mask) in photos.items():
        Image.fromarray(img).save(root / "photos" / f"{stem}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).convert("1").save(root / "masks" / f"{stem}.png")
    return root


def test_tile_labels_follow_the_mask_window(tmp_path):
    """A 681 × 454 photo is six 227-px tiles. Crack pixels: 300 in tile (0, 1); 25 in tile (1, 0)
    (fewer than mask_min_pixels: left out); 400 in tile (1, 2) starting 5 px from tile (1, 1),
    which is then within the margin (left out); tiles (0, 0) and (0, 2) hold none: clean."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (454, 681, 3), dtype=np.uint8)
    mask = np.zeros((454, 681), bool)
    mask[100:110, 330:360] = True  # 300 px in tile (0, 1)
    mask[340:345, 100:105] = True  # 25 px in tile (1, 0)
    mask[330:350, 459:479] = True  # 400 px in tile (1, 2), 5 px right of its left edge (x = 454)
    src = _photo_set(tmp_path / "set", {"p": (img, mask)})
    cfg = _cfg(str(src))
    got = sources.read_photos(cfg, cfg.data[0], 227, {})
    labels = {(r["x"], r["y"]): r["label"] for r in got.rows}
    assert labels == {(0, 0): 0, (227, 0): 1, (454, 0): 0, (454, 227): 1}
    assert got.stats == {"kind": "photos", "photos": 1, "tiles_left_out": 2, "photos_duplicated": 0}
    # a tile is its photo's pixels, and its URI reads back as the same bytes
    for row, blob in zip(got.rows, got.blobs):
        x, y, w, h = row["x"], row["y"], row["w"], row["h"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(blob))), img[y : y + h, x : x + w])
        assert row["uri"] == f"{src}/photos/p.png#{x},{y},{w},{h}" and row["group"] == "set/p"
        assert sources.read_items([row["uri"]], None) == [blob]
    # the summed-area counts equal counting the windows pixel by pixel
    cells = grid.grid(681, 454, 227, 0.0)
    for (_, _, x, y, w, h), (inside, around) in zip(cells, sources.window_counts(mask, cells, 16)):
        assert inside == mask[y : y + h, x : x + w].sum()
        assert around == mask[max(0, y - 16) : y + h + 16, max(0, x - 16) : x + w + 16].sum()
    # a photo no larger than tile_above tiles is one item: the whole photo
    small = _photo_set(tmp_path / "small", {"s": (img[:224, :224], mask[:224, :224])})
    one = sources.read_photos(_cfg(str(small)), SourceConfig(uri=str(small)), 227, {})
    assert [(r["x"], r["y"], r["w"], r["h"], r["label"]) for r in one.rows] == [(0, 0, 224, 224, 0)]


def test_sources_are_split_photo_by_photo_each_with_a_test_split(synth_data, photo_set):
    cfg = _cfg([str(synth_data), {"uri": str(photo_set), "name": "walls"}], val_fraction=0.25, test_fraction=0.25)
    p = labelled.scan(cfg)
    assert set(p.stats["sources"]) == {synth_data.name, "walls"}
    walls = p.stats["sources"]["walls"]
    assert walls["kind"] == "photos" and walls["photos"] == 8
    assert walls["items"] + walls["tiles_left_out"] == 8 * 12  # every tile is labelled or left out
    for name, st in p.stats["sources"].items():
        assert sum(st["per_split"]["test"].values()) > 0, name  # every source has its own test split
        assert sum(sum(v.values()) for v in st["per_split"].values()) == st["items"]
    split_of_photo: dict[str, str] = {}
    for r in p.manifest:
        if r["source"] == "walls":
            photo, box = sources.split_item_uri(r["uri"])
            assert box is not None
            assert split_of_photo.setdefault(photo, r["split"]) == r["split"]  # a photo's tiles stay together
    assert len(set(split_of_photo.values())) == 3
    # the per-split sources line up with images and labels
    for s in labelled.SPLITS:
        assert len(p.sources[s]) == len(p.images[s]) == len(p.labels[s])
    rows = list(csv.DictReader(io.StringIO(labelled.manifest_csv(p.manifest))))
    assert {r["source"] for r in rows} == {synth_data.name, "walls"}
    assert all(int(r["w"]) == 227 for r in rows if r["source"] == "walls")
    assert labelled.scan(cfg).manifest_hash == p.manifest_hash


def test_duplicates_across_sources_are_dropped(synth_data, photo_set, tmp_path):
    other = tmp_path / "other"
    (other / "Positive").mkdir(parents=True)
    shutil.copy(synth_data / "Positive" / "00007.jpg", other / "Positive" / "x1.jpg")
    shutil.copy(synth_data / "Positive" / "00008.jpg", other / "Positive" / "x2.jpg")
    (other / "Positive" / "x3.jpg").write_bytes(_jpeg(9))
    again = tmp_path / "again"
    shutil.copytree(photo_set, again)
    cfg = _cfg([str(synth_data), str(other), str(photo_set), str(again)], val_fraction=0.25, test_fraction=0.25)
    p = labelled.scan(cfg)
    st = p.stats["sources"]
    assert st["other"]["duplicates_dropped"] == 2 and st["other"]["items"] == 1
    assert st["again"]["photos_duplicated"] == 8 and st["again"]["items"] == 0
    assert p.stats["duplicates_dropped"] == 2


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (227, 227, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_sources_are_one_line_errors(tmp_path, synth_data):
    img = np.zeros((454, 681, 3), np.uint8)
    no_mask = _photo_set(tmp_path / "no-mask", {"a": (img, np.zeros((454, 681), bool))})
    Image.fromarray(img).save(no_mask / "photos" / "b.jpg")
    with pytest.raises(labelled.DataError, match=r"photo .*no-mask/photos/b.jpg has no mask in .*no-mask/masks"):
        labelled.scan(_cfg(str(no_mask)))
    sized = _photo_set(tmp_path / "sized", {"a": (img, np.zeros((450, 681), bool))})
    with pytest.raises(labelled.DataError, match=r"mask .*sized/masks/a.png is 681x450, its photo .*a.png is 681x454"):
        labelled.scan(_cfg(str(sized)))
    (tmp_path / "no-masks" / "photos").mkdir(parents=True)
    with pytest.raises(labelled.DataError, match=r"photo set .*no-masks has photos/ but no masks/ folder"):
        labelled.scan(_cfg(str(tmp_path / "no-masks")))
    empty = tmp_path / "empty"
    (empty / "Positive").mkdir(parents=True)
    with pytest.raises(labelled.DataError, match=r"source .*empty is empty: no files"):
        labelled.scan(_cfg([str(synth_data), str(empty)]))
    cracks = tmp_path / "cracks"
    shutil.copytree(synth_data / "Positive", cracks / "Positive")
    with pytest.raises(labelled.DataError, match=r"class folder missing: .*cracks/Negative"):
        labelled.scan(_cfg(str(cracks)))  # one source: it must hold both classes
    more = tmp_path / "more"
    shutil.copytree(synth_data / "Positive", more / "Positive")
    (more / "Positive" / "00001.jpg").write_bytes(_jpeg(1))  # not a duplicate of cracks/
    with pytest.raises(labelled.DataError, match=r"split 'train' has no 'Negative' images .* in .*cracks, .*more"):
        labelled.scan(_cfg([str(cracks), str(more)]))  # crack-only sources need one with clean images
    with pytest.raises(labelled.DataError, match="photo sets are cut into tiles of source_size pixels"):
        labelled.scan(_cfg(str(sized), source_size=0))
    with pytest.raises(ConfigError, match="two sources are named"):
        _cfg([str(cracks), str(tmp_path / "x" / "cracks")])
    with pytest.raises(ConfigError, match="weights add up to more than 1"):
        _cfg([{"uri": str(cracks), "weight": 0.7}, {"uri": str(more), "weight": 0.5}])
    # the job: one line, exit 2, nothing written
    runs = tmp_path / "runs"
    out = run_job(
        ["jobs/train.py", "--set", f"data={synth_data},{sized}", "--set", f"storage_path={runs}"], timeout=300
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is 681x450, its photo" in errors[0] and "Traceback" not in out.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_config_takes_one_source_or_a_list(tmp_path):
    one = from_dict(TrainConfig, {"data": "a/b"})
    assert one.data == (SourceConfig(uri="a/b"),) and one.data[0].label() == "b"
    two = from_dict(TrainConfig, {"data": ["a/b", {"uri": "s3://x/y/", "weight": 0.25, "name": "site"}]})
    assert [s.label() for s in two.data] == ["b", "site"] and two.data[1].weight == 0.25
    assert TrainConfig(data="a/b,c/d").data == (SourceConfig(uri="a/b"), SourceConfig(uri="c/d"))
    assert from_dict(TrainConfig, {"data": ""}).data == ()
    assert from_dict(TrainConfig, {"data": {"uri": "a/b", "weight": 0.5}}).data == (
        SourceConfig(uri="a/b", weight=0.5),
    )
    with pytest.raises(ConfigError, match=r"unknown config key 'data\[\]\.wieght'"):
        from_dict(TrainConfig, {"data": [{"uri": "a", "wieght": 1}]})


def test_epoch_shares():
    from crackscale.training.inputs import epoch_shares

    names = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    plain = _cfg(["x/a", "x/b", "x/c"])
    assert epoch_shares(plain, names) is None  # no weight: every item once per epoch
    weighted = _cfg([{"uri": "x/a"}, {"uri": "x/b"}, {"uri": "x/c", "weight": 0.5}])
    assert epoch_shares(weighted, names) == pytest.approx({"c": 0.5, "a": 0.5 * 60 / 90, "b": 0.5 * 30 / 90})
    alone = _cfg([{"uri": "x/a", "weight": 0.2}, {"uri": "x/c", "weight": 0.2}])
    assert epoch_shares(alone, names[:60] + names[90:]) == pytest.approx({"a": 0.5, "c": 0.5})


def test_weighted_batches_follow_the_shares():
    from crackscale.training import tfdata

    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    parts = [([png(10)] * 40, [0] * 40), ([png(200)] * 4, [1] * 4)]
    ds = tfdata.weighted_dataset(parts, [0.75, 0.25], 8, 32, seed=1, antialias=False)
    labels = np.concatenate([y.numpy() for _, y in ds.take(40)])
    assert len(labels) == 40 * 32
    assert labels.mean() == pytest.approx(0.25, abs=0.03)  # the small source is a quarter of every epoch


def test_threshold_holds_on_every_source():
    y = np.array([1, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.95, 0.25, 0.05])
    names = ["a"] * 6 + ["b"] * 4
    thr, own = M.threshold_for_sources(y, p, names, {}, 1.0)
    assert own == {"a": 0.6, "b": 0.3} and thr == 0.3  # b's weakest crack sets it
    pooled = M.threshold_for_recall(y, p, 0.8)
    assert pooled > 0.3  # a pooled threshold for 0.8 recall would miss b's crack
    thr, own = M.threshold_for_sources(y, p, names, {"b": 0.5}, 1.0)
    assert own == {"a": 0.6, "b": 0.95} and thr == 0.6
    table = M.source_table(y, p, names, 0.3)
    assert table["a"] == {
        "n": 6,
        "cracks": 4,
        "clean": 2,
        "recall": 1.0,
        "false_alarms": 0.0,
        "precision": 1.0,
        "roc_auc": 1.0,
        "missed": 0,
        "false_alarm_count": 0,
    }
    assert table["b"]["false_alarms"] == 0.0 and table["b"]["recall"] == 1.0
    assert M.source_table(np.array([1, 1]), np.array([0.2, 0.9]), ["c", "c"], 0.5)["c"]["false_alarms"] is None


def test_a_photo_set_on_s3_gives_the_local_tiles(s3_server, s3_bucket, photo_set):
    from conftest import upload_tree

    from crackscale.config.storage import StorageConfig

    upload_tree(s3_server, photo_set, s3_bucket, "walls")
    uri = f"s3://{s3_bucket}/walls"
    storage_cfg = {"s3_endpoint": s3_server}
    remote = labelled.scan(
        _cfg({"uri": uri, "name": "walls"}, storage=storage_cfg, val_fraction=0.25, test_fraction=0.25)
    )
    local = labelled.scan(_cfg({"uri": str(photo_set), "name": "walls"}, val_fraction=0.25, test_fraction=0.25))
    assert remote.manifest_hash == local.manifest_hash  # the same tiles, labels and splits
    tile = remote.manifest[0]["uri"]
    assert tile.startswith(f"{uri}/photos/") and sources.split_item_uri(tile)[1]
    assert sources.read_items([tile], StorageConfig(s3_endpoint=s3_server)) == [
        remote.images[remote.manifest[0]["split"]][0]
    ]
