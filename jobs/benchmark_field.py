"""Field sources, measured (printed, not asserted): train a config on every source but one, then
measure the model on all of the source it never saw and on the test split of each source it did.

    python jobs/benchmark_field.py --config jobs/configs/field.yaml --leave-out cfd
    python jobs/benchmark_field.py --config jobs/configs/field.yaml --leave-out none   # the general model
    python jobs/benchmark_field.py --config jobs/configs/field.yaml --leave-out cfd --resume   # after a kill

Leave one source out is what a new site sees: the model has never seen its surface or camera.
Each run is ``crackscale train`` (run name ``field-<left out>-s<seed>``, resumable with
``--resume``) followed by ``crackscale evaluate`` with the runtime scoring would use: ``--split
all`` on the left-out source, ``--split test`` on the others. One JSON line: the per-source
tables, the training wall time and the config's sources; ``--results FILE`` also appends it to a
JSON-lines file (docs/benchmarks.md#field-sources is built from those lines).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout / working_dir

from crackscale import cli  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    from crackscale.config.loader import ConfigError, load, replace, to_dict
    from crackscale.config.train import TrainConfig
    from crackscale.evaluation import evaluate
    from crackscale.reports import page, training
    from crackscale.training import driver

    cfg = load(TrainConfig, args.config, args.set)
    names = [s.label() for s in cfg.data]
    if args.leave_out != "none" and args.leave_out not in names:
        raise ConfigError(f"--leave-out {args.leave_out!r} is not a source of the config: {', '.join(names)}")
    kept = [s for s in cfg.data if s.label() != args.leave_out]
    held = [s for s in cfg.data if s.label() == args.leave_out]
    name = cfg.name or f"field-{args.leave_out}-s{cfg.seed}"
    cfg = replace(cfg, data=[to_dict(s) for s in kept], name=name)
    t0 = time.time()
    summary = driver.run(cfg, resume=args.resume)
    train_s = time.time() - t0
    art = summary["artifact"]
    page.safely(training.training_report, art, cfg.storage)  # as crackscale train writes it
    tested, _ = evaluate(art, tuple(kept), split="test", cfg=cfg.storage)
    out = {
        "config": args.config,
        "left_out": args.leave_out,
        "seed": cfg.seed,
        "run": name,
        "artifact": art,
        "train_wall_s": round(train_s, 1),
        "epochs_run": summary["epochs_run"],
        "runtime": tested["runtime"],
        "threshold": tested["threshold"],
        "test": tested["sources"],
    }
    if held:
        unseen, _ = evaluate(art, tuple(held), split="all", cfg=cfg.storage)
        out["left_out_all"] = unseen["sources"][args.leave_out]
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(out) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_args(ap, " (a training config with several sources)")
    ap.add_argument("--leave-out", required=True, help="the source (by name) not trained on, or none")
    ap.add_argument("--resume", action="store_true", help="continue this run from its last checkpoint")
    ap.add_argument("--results", default="", help="also append the JSON line to this file")
    args = ap.parse_args()
    cli.setup_logging()
    return cli.run_guarded(run, args)


if __name__ == "__main__":
    cli.exit_process(main())
