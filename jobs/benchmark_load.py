"""Load benchmark (printed, not asserted): peak memory of the scoring driver and workers at a small
and a large N of tiny images; it must not grow with N.

    python jobs/benchmark_load.py --small 10000 --n 100000

Each N: N tiny JPEGs (16×16, a few distinct ones cycled) in a flat folder, a tiny model
(MobileNetV2 α 0.35, 32 px, untrained: memory does not depend on the weights), then
``jobs/score.py`` from the folder to Parquet with a fresh local Ray. The process tree is sampled
at 2 Hz: peak RSS of the driver (the job process), of the largest single Ray worker process
(decode tasks, model actor), of Ray's daemons (GCS, raylet, dashboard agents...) and of the sum.
"""

from __future__ import annotations

import argparse
import io
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


def tiny_images(dest: Path, n: int, size: int = 16) -> Path:
    """``n`` tiny JPEGs in ``dest`` (idempotent)."""
    import numpy as np
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    if sum(1 for _ in dest.glob("*.jpg")) == n:
        return dest
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    for i in range(n):
        (dest / f"{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    return dest


def role(cmdline: list[str], driver_pid: int, pid: int) -> str:
    if pid == driver_pid:
        return "driver"
    line = " ".join(cmdline)
    if line.startswith("ray::") or "default_worker.py" in line:
        return "worker"
    return "ray_daemons"


def run_measured(cmd: list[str], env: dict) -> tuple[dict, dict]:
    """Run ``cmd``; (its JSON summary, peak RSS MiB per role)."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"driver": 0.0, "worker_max": 0.0, "workers_sum": 0.0, "ray_daemons": 0.0, "total": 0.0}

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                now = {"driver": 0.0, "worker_max": 0.0, "workers_sum": 0.0, "ray_daemons": 0.0, "total": 0.0}
                for q in [root] + root.children(recursive=True):
                    try:
                        rss = q.memory_info().rss / 2**20
                        r = role(q.cmdline(), proc.pid, q.pid)
                    except psutil.Error:
                        continue
                    now["total"] += rss
                    if r == "worker":
                        now["worker_max"] = max(now["worker_max"], rss)
                        now["workers_sum"] += rss
                    else:
                        now[r] += rss
                for k, v in now.items():
                    peak[k] = max(peak[k], v)
            except psutil.Error:
                pass
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), {k: round(v) for k, v in peak.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--chunk-size", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/crackscale-load")
    ap.add_argument("--keep", action="store_true", help="keep the generated images between runs")
    args = ap.parse_args()
    work = Path(args.workdir)
    model_dir = work / "model-32"
    if not (model_dir / "model.json").is_file():
        from crackscale import artifact
        from crackscale import model as M
        from crackscale.config.train import TrainConfig

        m, _ = M.build(TrainConfig(weights="none", image_size=32, alpha=0.35))
        artifact.save(
            m,
            {
                "name": "load-bench",
                "class_names": ["Negative", "Positive"],
                "crack_class": "Positive",
                "image_size": 32,
                "threshold": 0.5,
            },
            str(model_dir),
        )
    env = dict(os.environ, RAY_ADDRESS=os.environ.get("RAY_ADDRESS", "local"))
    rows = {}
    for n in (args.small, args.n):
        images = tiny_images(work / f"images-{n}", n)
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        s, mem = run_measured(
            [
                sys.executable,
                "jobs/score.py",
                "--model",
                str(model_dir),
                "--input",
                str(images),
                "--output",
                str(out),
                "--set",
                f"chunk_size={args.chunk_size}",
                "--set",
                f"batch_size={args.batch_size}",
                "--set",
                f"cache_dir={work / 'cache'}",
            ],
            env,
        )
        if s["scored"] + s["failed"] != n:
            raise RuntimeError(f"N={n}: {s['scored']} scored + {s['failed']} failed != {n}")
        rows[n] = {
            "scored": s["scored"],
            "failed": s["failed"],
            "chunks": s["chunks"],
            "wall_s": s["duration_s"],
            "img_s": s["throughput_img_s"],
            "peak_rss_mib": mem,
        }
        if not args.keep:
            shutil.rmtree(images, ignore_errors=True)
    small, big = rows[args.small]["peak_rss_mib"], rows[args.n]["peak_rss_mib"]
    ratio = {k: round(big[k] / small[k], 2) if small[k] else None for k in small}
    print(f"\ntiny images (16 px → 32 px model), {os.cpu_count()} CPUs; peak RSS MiB per role\n")
    print("| N | wall s | img/s | driver | largest worker | all workers | Ray daemons | total |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, r in rows.items():
        m = r["peak_rss_mib"]
        print(
            f"| {n:,} | {r['wall_s']:.0f} | {r['img_s']:.0f} | {m['driver']} | {m['worker_max']} | "
            f"{m['workers_sum']} | {m['ray_daemons']} | {m['total']} |"
        )
    print(json.dumps({"runs": rows, "peak_ratio_large_over_small": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
