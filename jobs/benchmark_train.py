"""Benchmark: one Ray Train worker vs plain single-process ``model.fit``, same data and model, and
the two ingest modes side by side; the driver's memory for listing + split at several N.

Prints images/s of each (median epoch after the first, validation included in all) and the
ratios, side by side in one run. Numbers, not asserts.

    python jobs/benchmark_train.py [--epochs 4] [--per-class 300] [--image-size 96] [--alpha 0.35]
    python jobs/benchmark_train.py --listing 10000,200000 --skip-training

``--listing``: for each N, N tiny distinct JPEGs (half per class) and a fresh process that starts a
private Ray and runs the ``ingest: ray_data`` listing, hashing (in Ray Data tasks), de-duplication
and grouped split; its peak RSS (the driver's) and the ratio of the largest N's to the smallest's.
"""

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crackscale import cli  # noqa: E402
from crackscale import model as M  # noqa: E402
from crackscale.config.loader import replace  # noqa: E402
from crackscale.config.train import TrainConfig  # noqa: E402
from crackscale.data import labelled, synth  # noqa: E402
from crackscale.training import driver, tfdata  # noqa: E402

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "concrete-crack"


def plain_fit(cfg: TrainConfig, prepared: labelled.Prepared) -> list[float]:
    """Epoch times of a plain tf.keras fit (no Ray, no strategy)."""
    k = M.keras()
    mdl, base = M.build(cfg)
    M.set_phase(cfg, mdl, base, "head")
    tr = tfdata.tf_dataset(
        prepared.images["train"],
        prepared.labels["train"],
        cfg.image_size,
        cfg.batch_size,
        shuffle=True,
        seed=0,
        repeat=True,
        antialias=cfg.resize_antialias,
    )
    va = tfdata.tf_dataset(
        prepared.images["val"],
        prepared.labels["val"],
        cfg.image_size,
        cfg.batch_size,
        shuffle=False,
        seed=0,
        repeat=True,
        antialias=cfg.resize_antialias,
    )
    times: list[float] = []

    class Timer(k.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    mdl.fit(
        tr,
        epochs=cfg.head_epochs,
        steps_per_epoch=tfdata.steps(len(prepared.images["train"]), cfg.batch_size),
        validation_data=va,
        validation_steps=tfdata.steps(len(prepared.images["val"]), cfg.batch_size),
        callbacks=[Timer()],
        verbose=2,
    )
    return times


LISTING = """
import json, resource, sys, time, ray
from crackscale.config.train import TrainConfig
from crackscale.data import ingest
ray.init(num_cpus=2, include_dashboard=False)
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cfg = TrainConfig(data=sys.argv[1], weights="none", group_size=50)
t = time.time()
index = ingest.scan(cfg, sys.argv[1])
scan_s = time.time() - t
print(json.dumps({"images": index.stats["images"], "scan_s": scan_s, "floor_rss_mib": floor,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
ray.shutdown()
"""


def tiny_tree(dest: Path, n: int) -> Path:
    """``n`` distinct 16×16 JPEGs, half under each class folder (idempotent): a few encoded images
    cycled, each made unique by bytes after its end marker (decoders ignore them)."""
    import numpy as np
    from PIL import Image

    if (dest / "done").exists():
        return dest
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    for c, cls in enumerate(("Negative", "Positive")):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for i in range(c, n, 2):
            (dest / cls / f"{i:07d}.jpg").write_bytes(blobs[i % 16] + str(i).encode())
    (dest / "done").touch()
    return dest


def listing_memory(sizes: list[int], work: Path) -> dict:
    """Peak RSS of a driver that lists, hashes (Ray Data) and splits N files, per N."""
    out = {}
    root = Path(__file__).resolve().parent.parent
    for n in sizes:
        tree = tiny_tree(work / f"listing-{n}", n)
        env = dict(os.environ, RAY_ADDRESS="local", PYTHONPATH=str(root))
        r = subprocess.run([sys.executable, "-c", LISTING, str(tree)], capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"listing + split of {n} files: {json.dumps(out[n])}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--alpha", type=float, default=0.35)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--listing", default="", help="comma list of N for the driver-memory rows (e.g. 10000,200000)")
    ap.add_argument("--skip-training", action="store_true", help="only the --listing rows")
    ap.add_argument(
        "--workdir",
        default="/tmp/crackscale-bench-train",
        help="scratch folder: the --listing trees (kept for the next run) and the training runs (removed after)",
    )
    args = ap.parse_args()
    cli.setup_logging()
    result: dict = {}
    if args.listing:
        sizes = [int(n) for n in args.listing.split(",")]
        mem = listing_memory(sizes, Path(args.workdir))
        result["listing"] = mem
        result["listing_peak_rss_ratio"] = round(mem[max(sizes)]["peak_rss_mib"] / mem[min(sizes)]["peak_rss_mib"], 3)
    if args.skip_training:
        print(json.dumps(result))
        return 0
    # the runs go under --workdir, made anew and removed after: nothing left in the system's temp dir
    tmp = Path(args.workdir) / "training"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        return training(args, tmp, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def training(args: argparse.Namespace, tmp: Path, result: dict) -> int:
    """The three epoch-rate runs (plain fit, Ray Train with each ingest mode) in ``tmp``."""
    src = REAL if REAL.is_dir() else synth.generate(tmp / "data", per_class=args.per_class)
    cfg = TrainConfig(
        data=str(src),
        weights="none",
        image_size=args.image_size,
        alpha=args.alpha,
        batch_size=args.batch_size,
        head_epochs=args.epochs,
        fine_tune_epochs=0,
        head_lr=1e-3,
        limit_per_class=args.per_class,
        storage_path=str(tmp / "runs"),
        name="bench",
        patience=args.epochs,
        cpus_per_worker=2,
        group_size=1,
    )
    prepared = labelled.scan(cfg, str(src))
    n_train = tfdata.steps(len(prepared.images["train"]), cfg.batch_size) * cfg.batch_size

    plain = plain_fit(cfg, prepared)

    def epoch_times(c: TrainConfig) -> list[float]:
        summary = driver.run(c)
        return [h["epoch_s"] for h in json.loads(Path(summary["artifact"], "model.json").read_text())["history"]]

    ray_times = epoch_times(cfg)
    # the same run with Ray Data ingest: decoded in Ray Data tasks (once, cached: the data is small)
    rd_times = epoch_times(replace(cfg, name="bench-ray-data", ingest="ray_data"))

    def ips(times: list[float]) -> float:
        return n_train / statistics.median(times[1:] if len(times) > 1 else times)

    result = {
        **result,
        "data": str(src),
        "train_images_per_epoch": n_train,
        "epochs": args.epochs,
        "image_size": cfg.image_size,
        "alpha": cfg.alpha,
        "batch_size": cfg.batch_size,
        "plain_fit_img_s": round(ips(plain), 1),
        "ray_train_1_worker_img_s": round(ips(ray_times), 1),
        "ray_data_1_worker_img_s": round(ips(rd_times), 1),
        "plain_epoch_s": [round(t, 2) for t in plain],
        "ray_epoch_s": ray_times,
        "ray_data_epoch_s": rd_times,
    }
    result["ray_overhead_ratio"] = round(result["plain_fit_img_s"] / result["ray_train_1_worker_img_s"], 3)
    result["ray_data_over_driver_ingest"] = round(
        result["ray_data_1_worker_img_s"] / result["ray_train_1_worker_img_s"], 3
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
