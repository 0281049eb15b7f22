"""Whole inspection photos: the tile grid, photos stitched from crops with known crack cells scored
as tiles (each tile as its crop scored as a file), per-photo verdicts and tiles committed exactly
once through kills, TIFF/WebP/16-bit input, big photos within a memory bound, crack maps."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PY, REAL_DATA, ROOT, job_env, kill_tree, last_json, run_job
from PIL import Image

from crackscale import query
from crackscale.config.score import ScoreConfig
from crackscale.imaging import jpeg
from crackscale.scoring import commit, tiles
from crackscale.scoring import decode as scoring_decode
from crackscale.scoring import run as scoring_run


@pytest.mark.parametrize(
    ("w", "h", "side", "overlap", "n"),
    [
        (3632, 2724, 227, 0.0, 16 * 12),
        (1000, 500, 227, 0.25, 6 * 3),
        (300, 4000, 227, 0.5, 2 * 35),
        (100, 50, 227, 0, 1),
    ],
)
def test_grid_covers_every_pixel_and_shifts_edge_tiles_inward(w, h, side, overlap, n):
    cells = tiles.grid(w, h, side, overlap)
    assert len(cells) == n
    covered = np.zeros((h, w), bool)
    for r, c, x, y, tw, th in cells:
        assert 0 <= x and x + tw <= w and 0 <= y and y + th <= h  # never past the edge
        assert (tw, th) == (min(side, w), min(side, h))
        covered[y : y + th, x : x + tw] = True
    assert covered.all()
    rows, cols = max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1
    assert rows * cols == n and cells[-1][:2] == (rows - 1, cols - 1)
    assert cells[-1][2] + cells[-1][4] == w and cells[-1][3] + cells[-1][5] == h  # the last tile ends at the edge


def test_which_images_are_tiled():
    cfg = ScoreConfig()
    assert tiles.tile_side({"source_size": 227}, cfg) == 227 and tiles.tile_side({}, cfg) == 0
    assert tiles.tile_side({}, ScoreConfig(tile_size=64)) == 64
    assert not tiles.tiled(227, 227, 227, cfg) and not tiles.tiled(340, 300, 227, cfg)  # about a crop: whole
    assert tiles.tiled(4032, 3024, 227, cfg) and not tiles.tiled(4032, 3024, 0, cfg)


def _tiff16(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16)).save(buf, "TIFF")
    return buf.getvalue()


def test_tiff_webp_and_16_bit_images_decode_to_the_model_input(synth_data):
    """TIFF (8/16-bit, RGB/grey) and WebP decode through Pillow, EXIF orientation applied; a 16-bit
    grey scan gives the pixels of its 8-bit version."""
    crop = Image.open(next((synth_data / "Positive").glob("*.jpg"))).convert("RGB")
    grey = np.asarray(crop.convert("L"))
    cfg = ScoreConfig()
    files = {}
    for name, fmt, img in (("a.tif", "TIFF", crop), ("a.webp", "WEBP", crop), ("g.tiff", "TIFF", crop.convert("L"))):
        buf = io.BytesIO()
        img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        files[name] = buf.getvalue()
    files["g16.tif"] = _tiff16(grey.astype(np.uint16) * 257)  # 16-bit: v * 257 >> 8 == v
    out = {name: scoring_decode.decode_image(b, name, 64, cfg) for name, b in files.items()}
    assert all(err == "" and img.shape == (64, 64, 3) for img, err in out.values()), out
    assert np.array_equal(out["g16.tif"][0], out["g.tiff"][0])
    assert np.abs(out["a.webp"][0].astype(int) - out["a.tif"][0]).max() == 0  # lossless WebP: same pixels
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown turned 90° clockwise
    crop.rotate(90, expand=True).save(rotated, "TIFF", exif=exif)
    img, err = scoring_decode.decode_image(rotated.getvalue(), "r.tif", 64, cfg)
    assert err == "" and np.abs(img.astype(int) - out["a.tif"][0]).mean() < 2


def _stitch(crops: list[Path], rows: int, cols: int) -> np.ndarray:
    """The crops' pixels (decoded as scoring decodes JPEGs) laid out row by row."""
    cells = [jpeg.decode_full(p.read_bytes()) for p in crops]
    return np.concatenate([np.concatenate(cells[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0)


def _cells(data: Path | None, synth_data: Path, n: int) -> tuple[list[Path], np.ndarray]:
    """``n`` crops, cracks and no cracks interleaved at random: (files, is-crack per cell)."""
    root = data if data is not None else synth_data
    pos, neg = sorted((root / "Positive").glob("*.jpg")), sorted((root / "Negative").glob("*.jpg"))
    rng = np.random.default_rng(5)
    crack = rng.random(n) < 0.4
    files = [(pos if c else neg)[int((crack[:i] == c).sum())] for i, c in enumerate(crack)]
    return files, crack


@pytest.mark.slow
def test_stitched_photos_find_every_crack_cell_where_the_crops_do(ray_local, trained_run, synth_data, tmp_path):
    """16×12 crops of 227 px stitched into a 3632×2724 photo: the photo is cut into exactly those
    crops, and stored losslessly (PNG) each tile scores as its crop scored as a file, so every crack
    cell the files find is found at its (row, col) and per-tile accuracy is the files' (within 0.5
    points). Stored as JPEG (q95) the same grid comes back; how much re-compression moves a tile's
    probability is the model's robustness, not the tiling's, so it is not asserted here. Each
    photo's row holds the verdict of its highest tile and the tile counts. The crops are real
    (../shared/data) when present, synthetic otherwise; the test model learned synthetic cracks, so
    its recall is checked on synthetic crops only."""
    rows, cols = 12, 16
    real = REAL_DATA if REAL_DATA.is_dir() else None
    files, crack = _cells(real, synth_data, rows * cols)
    photo = _stitch(files, rows, cols)
    site = tmp_path / "in" / "site-a"
    site.mkdir(parents=True)
    Image.fromarray(photo).save(site / "deck.png")
    Image.fromarray(photo).save(site / "deck.jpg", quality=95)
    crops = tmp_path / "in" / "crops"
    crops.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, crops / f"{i:03d}.jpg")
    out = tmp_path / "scores"
    cfg = ScoreConfig(
        model=str(trained_run["artifact"]), input=str(tmp_path / "in"), output=str(out), cache_dir=str(tmp_path / "c")
    )
    s = scoring_run.run(cfg)
    assert (s["scored"], s["failed"]) == (rows * cols + 2, 0), s
    meta = json.loads((trained_run["artifact"] / "model.json").read_text())
    assert meta["source_size"] == 227  # learned from the training crops
    con = query.connect(str(out))
    file_p = dict(con.sql("SELECT uri, crack_probability FROM scores WHERE uri LIKE '%/crops/%'").fetchall())
    file_p = np.array([file_p[str(crops / f"{i:03d}.jpg")] for i in range(rows * cols)])
    # the threshold of the runtime that scored (the int8 model has its own), as every row records it
    ((thr,),) = con.sql("SELECT DISTINCT threshold FROM scores").fetchall()
    file_acc = float(((file_p >= thr) == crack).mean())
    if real is None:
        assert float((file_p[crack] >= thr).mean()) >= 0.9  # the model learned (its test recall is checked too)
    for name, tolerance in (("deck.png", 1e-5), ("deck.jpg", None)):
        t = query.tiles_of(con, str(site / name)).to_pylist()
        assert [(r["row"], r["col"]) for r in t] == [(r, c) for r in range(rows) for c in range(cols)]
        assert all((r["x"], r["y"], r["w"], r["h"]) == (r["col"] * 227, r["row"] * 227, 227, 227) for r in t)
        tile_p = np.array([r["probability"] for r in t])
        found = tile_p >= thr
        if tolerance:
            assert np.abs(tile_p - file_p).max() <= tolerance
            assert (found[crack] | ~(file_p[crack] >= thr)).all(), f"{name}: a crack cell the crop finds is missed"
            assert abs(float((found == crack).mean()) - file_acc) <= 0.005, name
        ((n_tiles, crack_tiles, p, verdict),) = con.sql(
            "SELECT tiles, crack_tiles, crack_probability, crack FROM scores WHERE uri = ?", params=[str(site / name)]
        ).fetchall()
        assert (n_tiles, crack_tiles) == (rows * cols, int(found.sum()))
        assert p == pytest.approx(tile_p.max()) and verdict == bool(found.any())
    ranked = query.photos(con, 5).to_pylist()
    assert {r["uri"] for r in ranked} == {str(site / "deck.png"), str(site / "deck.jpg")}
    # the report: a crack map per photo with a crack, sites, the review queue
    from crackscale.reports import scoring as report_scoring

    report = report_scoring.scoring_report(str(out), s["run_id"], model_uri=str(trained_run["artifact"]), top_n=200)
    index = Path(report)
    page = index.read_text()
    # the throughput counts tiles: each photo's, and one for each crop scored whole
    assert f'id="tiles" data-value="{3 * rows * cols}"' in page
    # a photo among the top cracks shows its highest tile, the heatmap drawn on that tile
    for name in ("deck.png", "deck.jpg"):
        t = query.tiles_of(con, str(site / name)).to_pylist()
        best = max(t, key=lambda r: (r["probability"], -r["row"], -r["col"]))
        assert f"highest of {rows * cols} tiles: row {best['row']}, col {best['col']}" in page
    assert len(list(index.parent.glob("maps/*.png"))) == 2 and page.count('class="photo"') == 2
    assert page.count("class='site'") == 2 and page.count("class='review'") == 20
    with Image.open(index.parent / "maps" / "000.png") as m:
        assert max(m.size) == 480 and m.size[0] / m.size[1] == pytest.approx(cols / rows, rel=0.01)


def _photo_set(synth_data: Path, root: Path, n: int, side: int = 64) -> list[Path]:
    """``n`` 4×3-tile photos (tiles of ``side`` px) made of synthetic crops."""
    crops = sorted((synth_data / "Positive").glob("*.jpg")) + sorted((synth_data / "Negative").glob("*.jpg"))
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        cells = [np.asarray(Image.open(crops[(k * 12 + i) % len(crops)]).resize((side, side))) for i in range(12)]
        img = np.concatenate([np.concatenate(cells[r * 4 : r * 4 + 4], axis=1) for r in range(3)], axis=0)
        out.append(root / f"photo-{k:02d}.jpg")
        Image.fromarray(img).save(out[-1], quality=92)
    return out


def _scores_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.parquet") if not ({"_staging", "_tiles"} & set(p.parts))]


@pytest.mark.slow
def test_tiled_photos_commit_verdict_and_tiles_exactly_once_through_kills(synth_data, model_artifact, tmp_path):
    """A photo's scores row and its tiles commit together: SIGKILLed after its 1st and 3rd chunk
    commits and re-run, every photo has one row and each of its 12 tiles once. A tiles file left
    without its scores file (a kill between the two writes) is never read."""
    photos = _photo_set(synth_data, tmp_path / "in", 14)
    out = tmp_path / "scores"
    cmd = ["jobs/score.py", "--model", model_artifact["uri"], "--input", str(tmp_path / "in"), "--output", str(out)]
    cmd += [
        "--set",
        "tile_size=64",
        "--set",
        "chunk_size=1",
        "--set",
        "block_size=1",
        "--set",
        f"cache_dir={tmp_path}/c",
        # a killed run keeps its lease until it expires: the next run waits that long, then takes over
        "--set",
        "lease_ttl_s=3",
        "--wait",
    ]
    killed = 0
    for after in (1, 3):
        before = len(_scores_files(out))
        proc = subprocess.Popen(
            [PY, *cmd], cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 600 and len(_scores_files(out)) < before + after:
            time.sleep(0.005)
        killed += proc.poll() is None
        kill_tree(proc)
    assert killed == 2, "the job finished before it could be killed: the test proved nothing"
    # a kill between a chunk's two writes: its tiles file without its scores file
    mid = model_artifact["meta"]["model_sha256"][:16]
    (part,) = {p.parent for p in _scores_files(out)}
    orphan = out / commit.TILES_DIR / part.relative_to(out) / "part-000000000000000000000000.parquet"
    rows = pa.table({"uri": [str(photos[0])], "width": [256], "height": [192], "tile_probs": [bytes(48)]})
    pq.write_table(tiles.table(rows, 64, 0.0, "killed"), orphan)
    assert part.name.startswith("run_date=") and part.parent.name == f"model_id={mid}"
    r = run_job(cmd, env=job_env())
    assert r.returncode == 0, r.stderr[-3000:]
    s = last_json(r.stdout)
    assert s["already_scored"] + s["scored"] == 14 and s["failed"] == 0, s
    con = query.connect(str(out))
    assert con.sql("SELECT count(*), count(DISTINCT uri) FROM scores").fetchall() == [(14, 14)]
    assert con.sql("SELECT min(tiles), max(tiles) FROM scores").fetchall() == [(12, 12)]
    assert con.sql("SELECT count(*), count(DISTINCT (uri, row, col)) FROM tiles").fetchall() == [(14 * 12, 14 * 12)]
    assert con.sql("SELECT count(*) FROM tiles WHERE run_id = 'killed'").fetchall() == [(0,)]


def test_tiles_go_through_decode_tasks_as_through_the_actor(ray_local, synth_data, model_artifact, tmp_path):
    """The GPU layout (``decode: tasks``: CPU tasks cut the photos, the tiles travel with their rows
    to the model actor) gives every tile the probability the CPU layout gives it."""
    _photo_set(synth_data, tmp_path / "in", 3)
    got = {}
    for decode in ("actor", "tasks"):
        cfg = ScoreConfig(
            model=model_artifact["uri"],
            input=str(tmp_path / "in"),
            output=str(tmp_path / decode),
            tile_size=64,
            decode=decode,
            block_size=2,
            cache_dir=str(tmp_path / "c"),
        )
        s = scoring_run.run(cfg)
        assert (s["scored"], s["failed"]) == (3, 0), s
        con = query.connect(cfg.output)
        got[decode] = con.sql("SELECT uri, row, col, probability FROM tiles ORDER BY uri, row, col").fetchall()
    assert len(got["actor"]) == 3 * 12
    assert [r[:3] for r in got["tasks"]] == [r[:3] for r in got["actor"]]
    assert np.allclose([r[3] for r in got["tasks"]], [r[3] for r in got["actor"]], atol=1e-6)


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header claiming another size (the pixels stay tiny)."""
    i = data.index(b"\xff\xc0")
    return data[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9 :]


@pytest.mark.slow
def test_a_100_mp_photo_scores_within_the_memory_bound_and_broken_big_files_are_rows(model_artifact, tmp_path):
    """A 98 MP JPEG (8500 × 11500) is decoded once and cut into 1,938 tiles, the actor growing by the
    decoded photo (3 bytes a pixel) and the file's bytes, not more (docs/scoring.md; measured by the
    scoring benchmark's own memory probe); a truncated big JPEG, a header claiming 65,000 × 65,000 px
    over tiny data, a 16-bit TIFF and a WebP each become a score or a clear error row."""
    spec = importlib.util.spec_from_file_location("benchmark_score", ROOT / "jobs" / "benchmark_score.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (got,) = bench.photo_memory(Path(model_artifact["uri"]), tmp_path, 64, [8660]).values()
    big, small = tmp_path / "photo-8660.jpg", tmp_path / "photo-8660.jpg.small.jpg"
    width, height = Image.open(big).size
    assert got["error"] == "" and got["tiles"] == len(tiles.grid(width, height, 227, 0)) == 51 * 38, got
    # the decoded photo (3 B/px) and the file's bytes, plus a little working space
    bound = (3 * width * height + big.stat().st_size) / 2**20 + 64
    assert 2 * width * height / 2**20 <= got["grown_mib"] <= bound, (got, bound)
    tile = np.asarray(Image.open(small))
    data = big.read_bytes()
    cfg = ScoreConfig(tile_size=227)
    broken = {
        "truncated.jpg": data[: len(data) // 3],
        "claims-65000.jpg": _jpeg_with_size(small.read_bytes(), 65000, 65000),
    }
    for name, blob in broken.items():
        (tmp_path / name).write_bytes(blob)
    scan16 = np.tile(np.arange(0, 65535, 16, dtype=np.uint16)[None, :600], (400, 1))
    (tmp_path / "scan16.tif").write_bytes(_tiff16(scan16))
    Image.fromarray(np.tile(tile, (2, 3, 1))).save(tmp_path / "drone.webp", quality=90)
    uris = [str(tmp_path / n) for n in ("truncated.jpg", "claims-65000.jpg", "scan16.tif", "drone.webp")]
    out = scoring_decode.decode_batch({"uri": np.array(uris, dtype=object), "size": np.full(4, -1)}, 64, cfg, tile=227)
    errors = dict(zip(["truncated", "claims", "scan16", "drone"], out["error"]))
    assert errors["truncated"].startswith("decode: "), errors
    assert errors["claims"].startswith("too large: "), errors
    assert errors["scan16"] == errors["drone"] == "", errors
    assert list(out["n_tiles"][2:]) == [len(tiles.grid(600, 400, 227, 0)), len(tiles.grid(750, 500, 227, 0))]


def test_real_crops_stitched_score_like_files(real_data):
    """With the real sample present: stitched real crops give tiles bit-identical to the crops."""
    files, _ = _cells(real_data, real_data, 12)
    photo = _stitch(files, 3, 4)
    cells = tiles.grid(photo.shape[1], photo.shape[0], 227, 0.0)
    assert len(cells) == 12
    for (r, c, x, y, w, h), f in zip(cells, files):
        assert np.array_equal(photo[y : y + h, x : x + w], jpeg.decode_full(f.read_bytes()))
