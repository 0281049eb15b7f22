"""Scoring benchmark (printed, not asserted): model-only ceiling vs crackscale end-to-end vs the
original one-process script, and peak memory at a small and a large N.

    python jobs/benchmark_score.py --data ../shared/data/concrete-crack --n 20000 --small 2000

(a) ceiling: the fastest runtime (LiteRT/XNNPACK, fp32 and int8) on preloaded, decoded tensors:
    the fastest of one interpreter on all cores and one single-threaded interpreter per core (own
    processes), each at batch 1, 4, 16 and 64; measured right before and right after the large
    runs (a shared host's speed drifts), (b)/(a) uses the mean. A model without an int8 export gets
    one, calibrated on 200 of the data's images (labels from their class folders).
(a'') decode only: the scoring decode (JPEG bytes in memory → resized model input), one process
    per core. Decode and model share the cores, so no pipeline beats 1 / (1/(a) + 1/(a'')): the
    bound printed with the ratios.
(f) floor: a process that only starts and stops a private Ray; with the bound it gives the best
    whole process these cores allow, floor + N / bound, against (c).
(b) crackscale: ``jobs/score.py`` from storage to committed Parquet, timings from its summary:
    - the nightly way: two jobs in turn on a running ``ray start --head`` cluster (started here by
      ``cluster/local/cluster.sh up`` on free ports, and stopped); the second job is (b) in the
      ratios, the first also starts Ray Data's cluster-wide actors;
    - a Ray of its own per job (``RAY_ADDRESS=local``): local folder at the large and small N, and
      an S3 server on 127.0.0.1 started here;
    images decoded in the model actor (``decode: auto`` on CPU), and at the large N also in separate
    decode tasks (``decode: tasks``, the GPU layout) for comparison.
    Whole process: the wall time of ``jobs/score.py`` from exec to exit at N and at the small N
    gives the marginal rate (N − n) / (wall_N − wall_n) and the fixed cost wall_n − n / marginal.
(c) original: ``image_dataset_from_directory`` + ``model.predict`` in one process.
Peak memory: the largest total RSS of the process tree (driver + Ray + workers; on the cluster, the
cluster's processes too), sampled at 5 Hz.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout / working_dir
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ORIGINAL = """
import sys, time, numpy as np, tf_keras as k
d, model, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = k.models.load_model(model, compile=False)
t = time.time()
ds = k.utils.image_dataset_from_directory(d, labels=None, image_size=(size, size), shuffle=False)
p = m.predict(ds, verbose=0)
print(len(p), time.time() - t)
"""


def peak_rss(
    cmd: list[str], env: dict | None = None, gcs_port: int | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd``; (result, peak RSS in MiB of it and all its descendants, and with ``gcs_port``
    of the Ray cluster whose GCS listens there: its processes and theirs, the job's workers)."""
    import psutil

    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = [0.0]

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = {
                    q.pid: q for q in [p] + p.children(recursive=True) + (cluster_procs(gcs_port) if gcs_port else [])
                }
                peak[0] = max(peak[0], sum(q.memory_info().rss for q in procs.values() if q.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{err[-3000:]}")
    return res, peak[0]


def cluster_procs(gcs_port: int) -> list:
    """The processes of the Ray cluster whose GCS listens on ``gcs_port`` (those naming the port,
    and their descendants), as ``cluster/local/cluster.sh down`` finds them."""
    import re

    import psutil

    own = re.compile(rf"(--gcs[-_]address=\S+:{gcs_port}\b|--gcs_server_port={gcs_port}\b|--address=\S+:{gcs_port}\b)")
    procs = {q.pid: q for q in psutil.process_iter(["pid", "ppid", "cmdline"])}
    found = {q.pid for q in procs.values() if own.search(" ".join(q.info["cmdline"] or ()))}
    grew = True
    while grew:
        grew = False
        for q in procs.values():
            if q.info["ppid"] in found and q.pid not in found:
                found.add(q.pid)
                grew = True
    return [procs[i] for i in found]


def replicate(src: Path, dest: Path, n: int) -> Path:
    """``n`` JPEGs from the real sample, cycled, flat in ``dest`` (idempotent)."""
    files = sorted(src.rglob("*.jpg"))
    if not files:
        raise SystemExit(f"no .jpg files under {src}")
    dest.mkdir(parents=True, exist_ok=True)
    if len(list(dest.glob("*.jpg"))) != n:
        for i in range(n):
            shutil.copyfile(files[i % len(files)], dest / f"{i:06d}.jpg")
    return dest


def stitched(src: Path, dest: Path, photos: int, cols: int = 16, rows: int = 12) -> tuple[Path, Path]:
    """``photos`` whole photos of ``cols`` × ``rows`` real 227 px crops (JPEG, quality 95) in
    ``dest/photos``, and the same crops as separate files in ``dest/crops`` (idempotent)."""
    import numpy as np
    from PIL import Image

    from crackscale.imaging import jpeg

    files = sorted(src.rglob("*.jpg"))
    out, crops = dest / "photos", dest / "crops"
    if len(list(out.glob("*.jpg"))) == photos and len(list(crops.glob("*.jpg"))) == photos * cols * rows:
        return out, crops
    shutil.rmtree(dest, ignore_errors=True)
    out.mkdir(parents=True)
    crops.mkdir()
    for k in range(photos):
        cells = files[k * cols * rows : (k + 1) * cols * rows]
        for i, f in enumerate(cells):
            shutil.copyfile(f, crops / f"{k:03d}-{i:03d}.jpg")
        pix = [jpeg.decode_full(f.read_bytes()) for f in cells]
        img = np.concatenate([np.concatenate(pix[r * cols : (r + 1) * cols], axis=1) for r in range(rows)])
        Image.fromarray(img).save(out / f"photo-{k:03d}.jpg", quality=95)
    return out, crops


PHOTO_PEAK = """
import json, sys, threading, numpy as np, psutil
from PIL import Image
from crackscale.config.score import ScoreConfig
from crackscale.scoring.predictor import Predictor
model, side, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
cell = (rng.random((250, 250, 3)) * 255).astype(np.uint8)
Image.fromarray(cell).save(path + ".small.jpg")
Image.fromarray(np.tile(cell, (side // 250, side * 4 // 3 // 250, 1))).save(path, quality=90)
del cell
cfg = ScoreConfig(model=model, tile_size=227)
p = Predictor(cfg, decode={"image_size": int(sys.argv[4]), "cfg": cfg, "antialias": False, "tile": 227})
p({"uri": np.array([path + ".small.jpg"], dtype=object), "size": np.array([-1])})
me, peak, done = psutil.Process(), [0], threading.Event()
base = me.memory_info().rss
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], me.memory_info().rss)
        done.wait(0.005)
t = threading.Thread(target=sample); t.start()
out = p({"uri": np.array([path], dtype=object), "size": np.array([-1])})
done.set(); t.join()
grown = (peak[0] - base) / 2**20
w, h = Image.open(path).size
print(json.dumps({"mp": round(w * h / 1e6, 1), "tiles": int(out["n_tiles"][0]), "grown_mib": round(grown, 1),
                  "bytes_per_pixel": round(grown * 2**20 / (w * h), 2), "error": out["error"][0]}))
"""


def photo_memory(model: Path, work: Path, image_size: int, sides: list[int]) -> dict[str, dict]:
    """An actor's peak memory growth while it scores one 4:3 photo of each height in ``sides``
    (own processes)."""
    rows = {}
    for side in sides:
        r = subprocess.run(
            [sys.executable, "-c", PHOTO_PEAK, str(model), str(side), str(work / f"photo-{side}.jpg"), str(image_size)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        got = json.loads(r.stdout.strip().splitlines()[-1])
        rows[f"actor memory, one {got['mp']} MP photo"] = got
    return rows


def rate(rt, batch, seconds: float, start=None) -> float:
    """img/s of a runtime predicting ``batch`` over and over for ``seconds`` (after one warm-up)."""
    rt.predict(batch)
    if start is not None:  # all processes measure over the same seconds
        start.wait()
    n, t = 0, time.time()
    while time.time() - t < seconds:
        rt.predict(batch)
        n += len(batch)
    return n / (time.time() - t)


def litert_rate(model: bytes, batch, batch_size: int, threads: int, seconds: float, start=None, out=None) -> float:
    """img/s of one LiteRT interpreter (``threads`` 0: all cores); ``out``: a queue for the result."""
    from crackscale.runtimes.litert import LiteRTRuntime

    r = rate(LiteRTRuntime(model, batch_size, threads), batch, seconds, start)
    if out is not None:
        out.put(r)
    return r


def on_every_core(target, args: tuple, seconds: float) -> float:
    """Sum of ``target(*args, start, out)``'s rates run in one process per core, all measuring over
    the same seconds (``start``: a barrier; ``out``: a queue for each rate)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    k = os.cpu_count() or 1
    start, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, out)) for _ in range(k)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def per_core_rate(model: bytes, batch, batch_size: int, seconds: float) -> float:
    """Total img/s of one single-threaded interpreter per core, each in its own process."""
    return on_every_core(litert_rate, (model, batch, batch_size, 1, seconds), seconds)


def decode_rate(files: list[Path], size: int, antialias: bool, seconds: float, start=None, out=None) -> float:
    """img/s of the scoring decode (JPEG bytes in memory → resized uint8 tensor) in one process."""
    from crackscale.config.score import ScoreConfig
    from crackscale.scoring.decode import decode_image

    cfg, blobs = ScoreConfig(), [(p.read_bytes(), p.name) for p in files]
    for b, name in blobs[:8]:
        decode_image(b, name, size, cfg, antialias)
    if start is not None:
        start.wait()
    n, t = 0, time.time()
    while time.time() - t < seconds:
        b, name = blobs[n % len(blobs)]
        decode_image(b, name, size, cfg, antialias)
        n += 1
    r = n / (time.time() - t)
    if out is not None:
        out.put(r)
    return r


def decode_ceiling(files: list[Path], size: int, antialias: bool, seconds: float) -> float:
    """Total img/s of the scoring decode, one process per core (the cores the model shares)."""
    return on_every_core(decode_rate, (files, size, antialias, seconds), seconds)


RAY_FLOOR = """
import time, ray
t = time.time(); ray.init(num_cpus=2, include_dashboard=False); up = time.time() - t
t = time.time(); ray.shutdown(); print(up, time.time() - t)
"""


def ray_floor() -> dict:
    """Exec-to-exit of a process that only starts a private Ray and stops it: the part of a run's
    fixed cost no scoring work can remove."""
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-c", RAY_FLOOR],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, RAY_ADDRESS="local"),
    )
    up, down = (float(x) for x in r.stdout.split()[-2:])
    return {"process_s": time.time() - t0, "init_s": up, "shutdown_s": down}


def ceiling(
    model_dir: Path, images: Path, size: int, seconds: float = 10.0, batches: tuple[int, ...] = (1, 4, 16, 64)
) -> dict:
    """(a) the fastest LiteRT layout on decoded tensors already in memory: one interpreter on all
    cores and one single-threaded interpreter per core, each at batch 1, 4, 16 and 64 (XNNPACK runs
    small batches faster: their activations stay in cache); and tf.keras at batch 64."""
    import numpy as np

    from crackscale import artifact
    from crackscale.config.score import ScoreConfig
    from crackscale.imaging.tfdecode import resize_antialias
    from crackscale.runtimes.select import select
    from crackscale.scoring.decode import decode_image

    loaded = artifact.load(str(model_dir))
    cfg = ScoreConfig()
    aa = resize_antialias(loaded.meta)
    batch = np.stack(
        [decode_image(p.read_bytes(), p.name, size, cfg, aa)[0] for p in sorted(images.glob("*.jpg"))[:64]]
    )
    out: dict = {}
    for key, int8 in (("litert", False), ("int8", True)):
        lite = artifact.read_litert(str(model_dir), loaded.meta, int8=int8)
        sweep = {}
        for bs in batches:
            sweep[f"1 interpreter × {os.cpu_count()} threads, batch {bs}"] = litert_rate(
                lite, batch, bs, 0, seconds / 2
            )
            sweep[f"{os.cpu_count()} interpreters × 1 thread, batch {bs}"] = per_core_rate(lite, batch, bs, seconds / 2)
        best = max(sweep, key=sweep.get)
        out.update({key: sweep[best], f"{key}_layout": best, f"{key}_sweep": sweep})
    rt, _ = select(loaded.model, loaded.meta, "tf", 64)
    out["decode"] = decode_ceiling(sorted(images.glob("*.jpg"))[:256], size, aa, seconds / 2)
    return dict(out, tf=rate(rt, batch, seconds))


def with_int8(model_dir: Path, data: Path, size: int) -> None:
    """Give the artifact an int8 export calibrated on 200 of ``data``'s images, measured on 400
    others (labels from the class folders: the crack class is ``Positive``)."""
    import numpy as np

    from crackscale import artifact
    from crackscale.config.score import ScoreConfig
    from crackscale.imaging.tfdecode import resize_antialias
    from crackscale.scoring.decode import decode_image

    meta = json.loads((model_dir / "model.json").read_text())
    aa, cfg = resize_antialias(meta), ScoreConfig()
    pick = {c: sorted((data / c).glob("*.jpg")) for c in ("Negative", "Positive")}

    def images(files: list[Path]) -> np.ndarray:
        return np.stack([decode_image(p.read_bytes(), p.name, size, cfg, aa)[0] for p in files])

    rep = pick["Negative"][:100] + pick["Positive"][:100]
    val = pick["Negative"][100:300] + pick["Positive"][100:300]
    labels = np.array([0] * len(pick["Negative"][100:300]) + [1] * len(pick["Positive"][100:300]))
    artifact.add_int8(str(model_dir), artifact.Int8Data(images(rep), images(val), labels))


def crackscale_run(
    model: str,
    inp: str,
    out: str,
    env: dict | None = None,
    chunk_size: int = 2000,
    decode: str = "auto",
    gcs_port: int | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """``jobs/score.py`` with a Ray of its own (``RAY_ADDRESS=local``), or attached to the running
    cluster whose GCS listens on ``gcs_port``; its summary, with peak RSS and the steady rate."""
    env = dict(env or os.environ, RAY_ADDRESS="local")  # a fresh Ray per run, never a running cluster
    if gcs_port:
        env.update(RAY_ADDRESS=f"127.0.0.1:{gcs_port}", RAY_AUTH_MODE="token")
    t0 = time.time()
    res, mem = peak_rss(
        [
            sys.executable,
            "jobs/score.py",
            "--model",
            model,
            "--input",
            inp,
            "--output",
            out,
            "--set",
            f"chunk_size={chunk_size}",
            "--set",
            f"decode={decode}",
            *extra,
        ],
        env,
        gcs_port,
    )
    wall = time.time() - t0
    s = json.loads(res.stdout.strip().splitlines()[-1])
    s["peak_rss_mib"], s["process_wall_s"] = mem, wall
    # after the first result batch, whose images count as start-up (meaningless with < 3 chunks)
    if s.get("startup_s") is not None and s["chunks"] >= 3 and s["duration_s"] > s["startup_s"]:
        s["steady_img_s"] = (s["scored"] + s["failed"] - s["startup_images"]) / (s["duration_s"] - s["startup_s"])
    return s


def on_cluster(model: str, images: Path, work: Path, chunk_size: int, jobs: int = 2) -> list[dict]:
    """(b) the nightly way: ``jobs`` runs one after the other, attached to a ``ray start --head``
    cluster that ``cluster/local/cluster.sh up`` starts here (on free ports) and ``down`` stops. The
    first job on a new cluster also starts Ray Data's cluster-wide actors (stats, autoscaling
    coordinator, actor locations), which the later jobs find running."""
    import tempfile

    from tests.conftest import free_port, private_agent_ports

    port = free_port()
    tmp = tempfile.mkdtemp(prefix="bc", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(
        os.environ,
        RAY_PORT=str(port),
        DASHBOARD_PORT=str(free_port()),
        TEMP_DIR=tmp,
        RAY=str(Path(sys.executable).parent / "ray"),
    )
    up = subprocess.run(
        ["bash", "cluster/local/cluster.sh", "up", "--", *private_agent_ports()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        if up.returncode:
            raise RuntimeError(f"cluster.sh up failed:\n{up.stderr[-3000:]}")
        runs = []
        for i in range(jobs):
            out = work / f"out-cluster-{i}"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(crackscale_run(model, str(images), str(out), chunk_size=chunk_size, gcs_port=port))
        return runs
    finally:
        subprocess.run(
            ["bash", "cluster/local/cluster.sh", "down"], cwd=ROOT, env=env, capture_output=True, timeout=300
        )
        shutil.rmtree(tmp, ignore_errors=True)


def list_rates(endpoint: str, uri: str, latency: float = 0.1) -> dict[str, float]:
    """Seconds to list ``uri`` with one flat listing and with ``list_threads`` 16, straight from the
    server and through a proxy that delays each request by ``latency`` (a remote endpoint's round
    trip; the proxy is the test suite's). Each measured twice, interleaved; the faster is kept."""
    from crackscale.config.score import ScoreConfig
    from crackscale.config.storage import StorageConfig
    from crackscale.scoring.listing import list_input
    from tests.conftest import FaultyS3Proxy

    out: dict[str, float] = {}
    for delay in (0.0, latency):
        proxy = FaultyS3Proxy(endpoint, rate=0.0, latency=delay)
        for threads in (1, 16, 1, 16):
            cfg = ScoreConfig(input=uri, list_threads=threads, storage=StorageConfig(s3_endpoint=proxy.endpoint))
            t = time.time()
            sum(1 for _ in list_input(cfg))
            key = f"+{delay * 1000:.0f} ms per request, list_threads {threads}"
            out[key] = min(out.get(key, float("inf")), time.time() - t)
        proxy.close()
    return out


def row(s: dict) -> dict:
    """A (b) table row from a run summary of ``crackscale_run``."""
    return {
        "img_s": s["throughput_img_s"],
        "steady_img_s": s.get("steady_img_s"),
        "wall_s": s["duration_s"],
        "startup_s": s.get("startup_s"),
        "peak_rss_mib": s["peak_rss_mib"],
        "process_s": s["process_wall_s"],
        "process_img_s": (s["scored"] + s["failed"]) / s["process_wall_s"],
        "runtime": s.get("runtime"),
    }


def photo_runs(data: Path, work: Path, model_dir: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Tiles/s of ``jobs/score.py`` on photos stitched from crops (``tile_size: 227``) against
    crops/s on the same crops as files, both in tiles (images) per second; then an actor's memory
    growth per photo size."""
    photos, crops = stitched(data, work / f"stitched-{args.photos}", args.photos)
    out: dict[str, dict] = {}
    for key, inp, n_per in (("tiles of stitched photos", photos, 16 * 12), ("the same crops as files", crops, 1)):
        dest = work / "out-photos"
        shutil.rmtree(dest, ignore_errors=True)
        # one chunk per photo (1 per 192 crops): steady rates over the same number of chunks
        chunk = max(1, args.photos // 4) if n_per > 1 else max(1, args.photos // 4) * 16 * 12
        s = crackscale_run(str(model_dir), str(inp), str(dest), chunk_size=chunk, extra=("--set", "tile_size=227"))
        per = {
            k: (v * n_per if isinstance(v, (int, float)) and k in ("img_s", "steady_img_s") else v)
            for k, v in row(s).items()
        }
        out[key] = dict(per, images=s["scored"], tiles=s["scored"] * n_per)
    out.update(photo_memory(model_dir, work, args.image_size, [int(v) for v in args.photo_sides.split(",")]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "concrete-crack"))
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--workdir", default="/tmp/crackscale-bench")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each ceiling measurement")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each local (b) size; the median process is kept")
    ap.add_argument("--skip", default="", help="comma list of: s3, original, small, tasks, cluster, photos")
    ap.add_argument("--photos", type=int, default=10, help="stitched photos of 16x12 crops in the photos rows")
    ap.add_argument(
        "--photo-sides", default="3000,4250,8660", help="heights of the 4:3 photos of the memory rows (12, 24, 100 MP)"
    )
    ap.add_argument("--chunk-size", type=int, default=2000, help="scoring chunk_size (steady img/s needs >= 3 chunks)")
    ap.add_argument("--batches", default="1,4,16,64", help="batch sizes of the model-only sweep")
    ap.add_argument("--model", default="", help="a model artifact to benchmark (default: an untrained one built here)")
    ap.add_argument("--runtime", default="litert-int8", help="scoring runtime of the local runs (default litert-int8)")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    work = Path(args.workdir)
    big = replicate(Path(args.data), work / f"images-{args.n}", args.n)
    small = replicate(Path(args.data), work / f"images-{args.small}", args.small)
    from crackscale.imaging.tfdecode import RESIZE_ANTIALIAS

    model_dir = (
        Path(args.model) if args.model else work / f"model-{args.image_size}-{args.alpha}-aa{int(RESIZE_ANTIALIAS)}"
    )
    meta_file = model_dir / "model.json"
    if not args.model and (not meta_file.is_file() or "litert" not in json.loads(meta_file.read_text())):
        from crackscale import artifact
        from crackscale import model as M
        from crackscale.config.train import TrainConfig

        m, _ = M.build(TrainConfig(weights="none", image_size=args.image_size, alpha=args.alpha))
        artifact.save(
            m,
            {
                "name": "bench",
                "class_names": ["Negative", "Positive"],
                "crack_class": "Positive",
                "image_size": args.image_size,
                "threshold": 0.5,
                "resize_antialias": RESIZE_ANTIALIAS,
                "preprocessing": "see imaging.tfdecode.decode",
            },
            str(model_dir),
        )
    meta = json.loads(meta_file.read_text())
    args.image_size = int(meta["image_size"])
    if not (meta.get("litert_int8") or {}).get("sha256"):
        with_int8(model_dir, Path(args.data), args.image_size)
    if not args.model and "heatmap" not in meta:  # a cached bench model from before heatmap exports
        from crackscale import artifact

        artifact.add_heatmap(str(model_dir))
    rows: dict[str, dict] = {}

    def local_key(n: int, decode: str = "auto") -> str:
        return f"(b) crackscale local → Parquet, N={n}" + ("" if decode == "auto" else f", decode: {decode}")

    def local(n: int, images: Path, decode: str = "auto") -> None:
        """The run whose whole process took the median time of ``--repeat`` runs (the host's noise
        is of the order of the fixed cost's second or two), with every run's process time."""
        runs = []
        for _ in range(args.repeat):
            out = work / f"out-local-{n}"
            shutil.rmtree(out, ignore_errors=True)
            s = crackscale_run(
                str(model_dir),
                str(images),
                str(out),
                chunk_size=args.chunk_size,
                decode=decode,
                extra=("--set", f"runtime={args.runtime}"),
            )
            runs.append(row(s))
        runs.sort(key=lambda r: r["process_s"])
        rows[local_key(n, decode)] = dict(runs[len(runs) // 2], process_s_runs=[round(r["process_s"], 1) for r in runs])

    def cluster_key(n: int, job: str) -> str:
        return f"(b) crackscale local → Parquet, N={n}, on a running cluster, {job} job"

    # A shared host's speed drifts over minutes, so the ceiling is measured right before and right
    # after the large runs, and (b)/(a) uses their mean.
    batches = tuple(int(b) for b in args.batches.split(","))
    a0 = ceiling(model_dir, small, args.image_size, args.seconds, batches)
    if "cluster" not in skip:
        first, *later = on_cluster(str(model_dir), big, work, args.chunk_size)
        rows[cluster_key(args.n, "first")] = row(first)
        rows[cluster_key(args.n, "next")] = row(later[-1])
    local(args.n, big)
    a1 = ceiling(model_dir, small, args.image_size, args.seconds, batches)
    if "small" not in skip:
        local(args.small, small)
    if "tasks" not in skip:
        local(args.n, big, decode="tasks")
    a = {k: (a0[k] + a1[k]) / 2 for k in ("litert", "int8", "tf", "decode")}
    floor = ray_floor()
    rows = {
        **{
            f"(a) model only, LiteRT {name}, preloaded tensors (fastest layout, mean of before/after)": {
                "img_s": a[key],
                "before": a0[key],
                "after": a1[key],
                "layout": [a0[f"{key}_layout"], a1[f"{key}_layout"]],
                "sweep": [a0[f"{key}_sweep"], a1[f"{key}_sweep"]],
            }
            for name, key in (("int8", "int8"), ("fp32", "litert"))
        },
        "(a') model only, tf.keras graph, preloaded": {"img_s": a["tf"]},
        "(a'') decode only, JPEG bytes in memory → model input, one process per core": {
            "img_s": a["decode"],
            "before": a0["decode"],
            "after": a1["decode"],
        },
        "(f) a process that only starts and stops a private Ray": {
            "process_s": floor["process_s"],
            "startup_s": floor["init_s"],
        },
        **{
            k: rows[k]
            for k in (
                cluster_key(args.n, "next"),
                cluster_key(args.n, "first"),
                local_key(args.small),
                local_key(args.n),
                local_key(args.n, "tasks"),
            )
            if k in rows
        },
    }
    if "s3" not in skip:
        from concurrent.futures import ThreadPoolExecutor

        import boto3
        from moto.server import ThreadedMotoServer

        from tests.conftest import free_port

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        env = dict(
            os.environ,
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        with ThreadPoolExecutor(16) as pool:  # in 20 folders, as sites of an inspection bucket
            list(
                pool.map(
                    lambda ip: s3.upload_file(str(ip[1]), "bench", f"images/site-{ip[0] % 20:02d}/{ip[1].name}"),
                    enumerate(sorted(big.glob("*.jpg"))),
                )
            )
        s = crackscale_run(str(model_dir), "s3://bench/images/", "s3://bench/scores/", env, args.chunk_size)
        rows[f"(b) crackscale S3 (moto) → S3 Parquet, N={args.n}"] = row(s)
        listing = list_rates(endpoint, "s3://bench/images/")
        server.stop()
    if "original" not in skip:
        for n, d in ([] if "small" in skip else [(args.small, small)]) + [(args.n, big)]:
            t0 = time.time()
            res, mem = peak_rss(
                [sys.executable, "-c", ORIGINAL, str(d), str(model_dir / "model.keras"), str(args.image_size)]
            )
            wall = time.time() - t0
            cnt, secs = res.stdout.split()[-2:]
            rows[f"(c) image_dataset_from_directory + predict, N={n}"] = {
                "img_s": int(cnt) / float(secs),
                "wall_s": float(secs),
                "peak_rss_mib": mem,
                "process_s": wall,
                "process_img_s": int(cnt) / wall,
            }
    photo_rows = {} if "photos" in skip else photo_runs(Path(args.data), work, model_dir, args)
    for k, v in listing.items() if "s3" not in skip else ():
        print(f"S3 listing of N={args.n} keys in 20 folders, {k}: {v:.2f} s")
    print(f"\nMobileNetV2 α={args.alpha}, {args.image_size} px, {os.cpu_count()} CPUs\n")
    for key in ("litert", "int8"):
        print(f"(a) LiteRT {'int8' if key == 'int8' else 'fp32'} ceiling sweep, img/s before / after the local runs:")
        for k in a0[f"{key}_sweep"]:
            print(f"    {k}: {a0[f'{key}_sweep'][k]:.0f} / {a1[f'{key}_sweep'][k]:.0f}")
        print(f"    fastest: {a0[f'{key}_layout']} ({a0[key]:.0f}) / {a1[f'{key}_layout']} ({a1[key]:.0f})\n")
    print(
        "| path | img/s (run) | img/s (steady) | run s | start-up s | whole process s | img/s (whole process) "
        "| peak RSS MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, v in rows.items():
        f = lambda x, p=0: "" if x is None else f"{x:.{p}f}"  # noqa: E731
        print(
            f"| {k} | {f(v.get('img_s'))} | {f(v.get('steady_img_s'))} | {f(v.get('wall_s'), 1)} "
            f"| {f(v.get('startup_s'), 1)} | {f(v.get('process_s'), 1)} | {f(v.get('process_img_s'))} "
            f"| {f(v.get('peak_rss_mib'))} |"
        )
    # (b) is the nightly way when measured (a job on a cluster that has run one before), else a job
    # with a Ray of its own
    primary = cluster_key(args.n, "next") if cluster_key(args.n, "next") in rows else local_key(args.n)
    b, private = rows[primary], rows[local_key(args.n)]
    c = rows.get(f"(c) image_dataset_from_directory + predict, N={args.n}", {})

    def ceil(r: dict) -> float:
        return a["int8"] if r.get("runtime") == "litert-int8" else a["litert"]

    ratios = {
        "int8_over_fp32_model_only": a["int8"] / a["litert"],
        # (b) over the ceiling of the runtime it scored with
        "b_over_a_wall": b.get("img_s", 0) / ceil(b),
        "b_over_a_steady": (b.get("steady_img_s") or 0) / ceil(b),
        "b_private_ray_over_a_wall": private["img_s"] / ceil(private),
        "b_private_ray_over_a_steady": (private.get("steady_img_s") or 0) / ceil(private),
    }
    # decode and model share the cores: no pipeline on them beats one decode + one inference per image
    model_only = a["int8" if args.runtime == "litert-int8" else "litert"]
    bound = 1 / (1 / model_only + 1 / a["decode"])
    ratios["decode_and_model_bound_over_model_only"] = bound / model_only
    derived: dict = {"bound_img_s": bound, "floor_s": floor["process_s"]}
    if c:
        # the best whole process these cores allow: the Ray floor + N at the bound
        best = floor["process_s"] + args.n / bound
        ratios["best_possible_process_over_c_process"] = c["process_s"] / best
    print(
        f"\nbound: decode {a['decode']:.0f} img/s and model {model_only:.0f} img/s on the same cores → at most "
        f"{bound:.0f} img/s ({bound / model_only:.2f} of model only); a private Ray's start + stop alone: "
        f"{floor['process_s']:.1f} s (init {floor['init_s']:.1f} s, shutdown {floor['shutdown_s']:.1f} s)"
    )
    if local_key(args.small) in rows:
        big_s, small_s = rows[local_key(args.n)]["process_s"], rows[local_key(args.small)]["process_s"]
        if big_s <= small_s:  # sizes too close for this host's noise
            print(f"\nwhole process: not measurable, N={args.n} took no longer than N={args.small}")
        else:
            marginal = (args.n - args.small) / (big_s - small_s)
            derived.update(marginal_img_s=marginal, fixed_s=small_s - args.small / marginal)
            ratios["marginal_over_model_only"] = marginal / a["int8" if args.runtime == "litert-int8" else "litert"]
            print(
                f"\nwhole process, {args.runtime}: marginal {marginal:.0f} img/s between N={args.small} and "
                f"N={args.n}, fixed {derived['fixed_s']:.1f} s; the small run's process {small_s:.1f} s for "
                f"{rows[local_key(args.small)]['wall_s']:.1f} s of scoring run"
            )
            if args.repeat > 1:
                each = {k: rows[local_key(k)]["process_s_runs"] for k in (args.small, args.n)}
                runs = ", ".join(f"N={k} {v}" for k, v in each.items())
                print(f"  whole-process seconds of the {args.repeat} runs: {runs}")
    if c:
        ratios["process_over_c_process"] = private["process_img_s"] / c["process_img_s"]
        ratios.update(
            b_over_c_wall=b.get("img_s", 0) / c["img_s"],
            b_over_c_steady=(b.get("steady_img_s") or 0) / c["img_s"],
            a_over_c=a["litert"] / c["img_s"],
        )
    for k, v in photo_rows.items():
        print(f"{k}: {json.dumps(v)}")
    if photo_rows:
        t, cr = photo_rows["tiles of stitched photos"], photo_rows["the same crops as files"]
        ratios["tiles_over_crops_steady"] = (t.get("steady_img_s") or 0) / (cr.get("steady_img_s") or 1)
        ratios["tiles_over_crops_wall"] = t["img_s"] / cr["img_s"]
    print(f"\n(b) in the ratios: {primary}")
    print("ratios at N=%d: %s" % (args.n, ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())))
    print(
        json.dumps(
            {
                "rows": rows,
                "photos": photo_rows,
                "ratios": ratios,
                "whole_process": derived,
                "b": primary,
                **({"listing_s": listing} if "s3" not in skip else {}),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
