"""Benchmark: one Ray Train worker vs plain single-process ``model.fit``, same data and model.

Prints images/s of each (median epoch after the first, validation included in both) and the
overhead ratio, side by side in one run. Numbers, not asserts.

    python jobs/benchmark_train.py [--epochs 4] [--per-class 300] [--image-size 96] [--alpha 0.35]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crackscale import cli  # noqa: E402
from crackscale import model as M  # noqa: E402
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--alpha", type=float, default=0.35)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    cli.setup_logging()
    tmp = Path(tempfile.mkdtemp(prefix="crackscale-bench-"))
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
    summary = driver.run(cfg)
    meta = json.loads(Path(summary["artifact"], "model.json").read_text())
    ray_times = [h["epoch_s"] for h in meta["history"]]

    def ips(times: list[float]) -> float:
        return n_train / statistics.median(times[1:] if len(times) > 1 else times)

    result = {
        "data": str(src),
        "train_images_per_epoch": n_train,
        "epochs": args.epochs,
        "image_size": cfg.image_size,
        "alpha": cfg.alpha,
        "batch_size": cfg.batch_size,
        "plain_fit_img_s": round(ips(plain), 1),
        "ray_train_1_worker_img_s": round(ips(ray_times), 1),
        "plain_epoch_s": [round(t, 2) for t in plain],
        "ray_epoch_s": ray_times,
    }
    result["ray_overhead_ratio"] = round(result["plain_fit_img_s"] / result["ray_train_1_worker_img_s"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
