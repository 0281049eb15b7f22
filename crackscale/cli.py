"""The ``crackscale`` console command: same functions as ``jobs/*.py``.

User errors (bad config, missing data, unreachable storage, bad artifact) print one line naming the
problem and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

EXAMPLES = {
    "train": "crackscale train --config jobs/configs/train.yaml --set num_workers=2 --set weights=none",
    "synth": "crackscale synth --out demo/data --per-class 200",
    "score": "crackscale score --model runs/demo/model --input s3://bucket/images/ --output s3://bucket/scores/",
    "query": "crackscale query top --output s3://bucket/scores/ --n 20",
    "tune": "crackscale tune --config jobs/configs/tune.yaml",
    "report": "crackscale report --run latest --output demo/scores",
    "doctor": "crackscale doctor",
}


def user_errors() -> tuple[type[BaseException], ...]:
    from crackscale.artifact import ArtifactError
    from crackscale.config import ConfigError
    from crackscale.data import DataError
    from crackscale.storage import StorageError

    return (ConfigError, StorageError, DataError, ArtifactError, FileNotFoundError)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; dotted keys for sections, e.g. storage.s3_endpoint=...)")


def train_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="jobs/train.py", description="Train a crack classifier on Ray.",
                                     epilog=f"example: {EXAMPLES['train']}")
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run named by `name` (default: the latest run in storage_path)")
    return p


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale import train
    from crackscale.config import TrainConfig, load

    cfg = load(TrainConfig, args.config, args.set)
    summary = train.run(cfg, resume=args.resume)
    from crackscale import report  # after training: a failed report never fails the run

    summary["report"] = report.safely(report.training_report, summary["artifact"], cfg.storage)
    return summary


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale import report, score

    summary = score.cmd_score(args)
    summary["report"] = report.safely(report.scoring_report, summary["output"], summary["run_id"],
                                      score.config_from_args(args).storage)
    return summary


def cmd_synth(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale import synth

    out = synth.generate(args.out, per_class=args.per_class, size=args.size, seed=args.seed)
    return {"out": str(out), "per_class": args.per_class}


def run_guarded(fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``fn``; print its JSON summary last, or one clear error line (exit 2)."""
    try:
        result = fn(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. weights that cannot be loaded, Ray Train failures
        msg = str(e).strip().splitlines()
        print(f"error: {msg[-1] if msg else type(e).__name__}", file=sys.stderr)
        return 1
    if isinstance(result, int):
        return result
    if result is not None:
        print(json.dumps(result, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crackscale", description="Distributed crack detection on Ray: train, tune, score, query.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (same as jobs/train.py)", epilog=f"example: {EXAMPLES['train']}")
    train_parser(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("synth", help="generate synthetic crack/no-crack images", epilog=f"example: {EXAMPLES['synth']}")
    p.add_argument("--out", default="demo/data")
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--size", type=int, default=227)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    from crackscale import doctor, query, report, score, tune

    score.add_cli(sub, func=cmd_score)
    for mod in (tune, query, report, doctor):
        mod.add_cli(sub)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
