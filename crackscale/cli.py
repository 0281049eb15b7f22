"""The ``crackscale`` console command and ``jobs/*.py``: one parser per command, the same functions.

Every command takes ``--config FILE`` and ``--set key=value``; its storage settings are the config's
``storage.*`` keys (``query``, ``report`` and ``doctor`` read a scoring config: its ``output`` and
``storage`` sections). User errors (bad config, missing data, unreachable storage, bad artifact)
print one line naming the problem and exit 2; no traceback.

Stage modules are imported inside the command functions: ``crackscale query`` need not import
Ray Train or TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from crackscale import storage
from crackscale.artifact import ArtifactError
from crackscale.config.loader import ConfigError, load
from crackscale.config.score import ScoreConfig
from crackscale.config.train import TrainConfig
from crackscale.config.tune import TuneConfig
from crackscale.data.labelled import DataError

EXAMPLES = {
    "train": "crackscale train --config jobs/configs/train.yaml --set num_workers=2 --set weights=none",
    "synth": "crackscale synth --out demo/data --per-class 200",
    "score": "crackscale score --model runs/demo/model --input s3://bucket/images/ --output s3://bucket/scores/",
    "query": "crackscale query top --output s3://bucket/scores/ --n 20",
    "tune": "crackscale tune --config jobs/configs/tune.yaml",
    "report": "crackscale report --run latest --output demo/scores",
    "doctor": "crackscale doctor",
    "repair": "crackscale repair --output s3://bucket/scores/",
    "export": "crackscale export --int8 demo/runs/train-20261124-101500/model",
    "evaluate": "crackscale evaluate --model runs/field/model --data ../shared/data/field/cfd --data site-b/",
}
MORE_EXAMPLES = {
    "synth": [
        "crackscale synth --out demo/photos --photos 1 --grid 8x6",
        "crackscale synth --out demo/photo-set --photos 4 --grid 4x3 --masks",
    ],
    "query": [
        "crackscale query counts --by night --config jobs/configs/score.yaml --format csv",
        'crackscale query --output scores/ --sql "SELECT count(*) FROM scores"',
    ],
    "report": [
        "crackscale report --run 20261124T010203Z-1a2b3c --output scores/ --top 24",
        "crackscale report --artifact runs/demo/model",
    ],
    "doctor": [
        "crackscale doctor --ray-address 10.0.0.5:6379 --bucket s3://crack-data",
        "RAY_AUTH_MODE=token crackscale doctor --ray-address http://127.0.0.1:8265 "
        "--set storage.s3_endpoint=http://minio:9000",
    ],
    "tune": ["crackscale tune --config jobs/configs/tune.yaml --set scheduler=pbt"],
    "evaluate": ["crackscale evaluate --model runs/field/model --data ../shared/data/concrete-crack --split test"],
}
HELP = {
    "train": "train a model (same as jobs/train.py)",
    "synth": "generate synthetic crack/no-crack images",
    "score": "score images with a model artifact into Parquet (same as jobs/score.py)",
    "query": "query scoring outputs (top cracks, counts, failures, SQL) with DuckDB",
    "tune": "search hyperparameters with Ray Tune (same as jobs/tune.py)",
    "report": "(re)build the HTML report of a scoring run or a model artifact",
    "doctor": "check Python/TF/Ray versions, the Ray cluster, S3 and GPUs",
    "repair": "move unreadable output files aside so that the next run scores their images again",
    "evaluate": "measure a model artifact on labelled sources, source by source (JSON + an HTML page of its errors)",
    "export": "add an int8 LiteRT export (measured on its validation split) or the heatmap export to a model artifact",
}
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    storage.StorageError,
    DataError,
    ArtifactError,
    FileNotFoundError,
)


# ---- shared arguments ---------------------------------------------------------------------------


def add_config_args(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--config", help=f"YAML config file{what} (keys: docs/configuration.md)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable; dotted keys for sections, e.g. "
        "storage.s3_endpoint=http://127.0.0.1:9000)",
    )


def add_storage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint", default="", help="= --set storage.s3_endpoint=URL")


def scoring_config(args: argparse.Namespace, flags: dict[str, str | None]) -> ScoreConfig:
    """The ScoreConfig of ``--config`` and ``--set``, with ``flags`` (config key → flag value) on top."""
    overrides = list(args.set)
    overrides += [f"{key}={value}" for key, value in flags.items() if value]
    if getattr(args, "s3_endpoint", ""):
        overrides.append(f"storage.s3_endpoint={args.s3_endpoint}")
    return load(ScoreConfig, args.config, overrides)


# ---- commands -----------------------------------------------------------------------------------


def train_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, " (keys of TrainConfig)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run named by `name` (default: the latest run in storage_path)",
    )


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale.reports import page, training
    from crackscale.training import driver

    cfg = load(TrainConfig, args.config, args.set)
    summary = driver.run(cfg, resume=args.resume)
    # after training: a failed report never fails the run
    summary["report"] = page.safely(training.training_report, summary["artifact"], cfg.storage)
    return summary


def tune_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, " (keys of TuneConfig)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the tuning run named by `name` (default: the latest in storage_path); "
        "finished trials are not run again",
    )


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale.tuning import driver

    return driver.run(load(TuneConfig, args.config, args.set), resume=args.resume)


def score_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, " (keys of ScoreConfig)")
    p.add_argument("--model", help="model artifact URI (= --set model=…)")
    p.add_argument("--input", help="image prefix or manifest URI (= --set input=…)")
    p.add_argument("--output", help="Parquet output root (= --set output=…)")
    p.add_argument(
        "--wait", action="store_true", help="wait while another run holds this output (= --set wait_for_lease=true)"
    )


def score_config(args: argparse.Namespace) -> ScoreConfig:
    flags = {"model": args.model, "input": args.input, "output": args.output}
    return scoring_config(args, {**flags, "wait_for_lease": "true" if getattr(args, "wait", False) else None})


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    """Load the config, attach to (or start) Ray, score, write the run's report; the JSON summary."""
    from crackscale.reports import page, scoring
    from crackscale.scoring import run

    cfg = score_config(args)
    if not cfg.report_ahead or not cfg.model or scoring.has_heatmap_export(cfg.model, cfg.storage):
        if cfg.report_ahead:
            scoring.import_ahead()
        summary = run.run(cfg)
        summary["report"] = page.safely(scoring.scoring_report, summary["output"], summary["run_id"], cfg.storage)
        return summary
    with scoring.ReportProcess(cfg.model, cfg.storage) as report:
        summary = run.run(cfg)
        summary["report"] = report.build(summary["output"], summary["run_id"])
    return summary


def query_arguments(p: argparse.ArgumentParser) -> None:
    from crackscale.query import COUNT_BY, FORMATS

    p.add_argument(
        "what",
        nargs="?",
        choices=("top", "counts", "failed", "photos", "tiles"),
        help="top: most likely cracks; counts: per night/prefix/model; failed: errors; "
        "photos: photos scored as tiles, most crack tiles first; tiles: one photo's tiles (--uri)",
    )
    p.add_argument("--uri", default="", help="the photo whose tiles `tiles` lists")
    p.add_argument(
        "--all-versions", action="store_true", help="every scored version of a changed image, not only its latest"
    )
    add_config_args(p, " (a scoring config: its output and storage are read)")
    p.add_argument("--output", help="scores root written by `crackscale score` (local or s3://; = --set output=…)")
    p.add_argument("--sql", help='any SQL over the view "scores", e.g. "SELECT count(*) FROM scores"')
    p.add_argument("--n", type=int, default=20, help="rows for top (default 20) / failed")
    p.add_argument("--by", default="night", choices=COUNT_BY, help="grouping for counts")
    p.add_argument("--prefix", default="", help="only images whose URI starts with this (a site/folder)")
    p.add_argument("--since", default="", help="first night (run_date YYYY-MM-DD), inclusive")
    p.add_argument("--until", default="", help="last night (run_date YYYY-MM-DD), inclusive")
    p.add_argument("--model", default="", help="model_id or model name (top defaults to the latest model)")
    p.add_argument("--format", default="table", choices=FORMATS)
    add_storage_flag(p)


def cmd_query(args: argparse.Namespace) -> int:
    from crackscale import query

    cfg = scoring_config(args, {"output": args.output})
    if not cfg.output:
        raise ConfigError("say where the scores are: --output URI (or output in --config)")
    con = query.connect(cfg.output, cfg.storage, all_versions=args.all_versions)
    filters = dict(prefix=args.prefix, since=args.since, until=args.until, model=args.model)
    if args.sql:
        table = query.sql(con, args.sql)
    elif args.what == "top":
        table = query.top(con, args.n, **filters)
    elif args.what == "counts":
        table = query.counts(con, args.by, **filters)
    elif args.what == "photos":
        table = query.photos(con, args.n, **filters)
    elif args.what == "tiles":
        if not args.uri:
            raise ConfigError("say which photo: crackscale query tiles --uri URI")
        table = query.tiles_of(con, args.uri, model=args.model)
    elif args.what == "failed":
        table = query.failed(con, n=args.n, **filters)
    else:
        raise ConfigError('say what to query: top, counts, failed, photos, tiles, or --sql "SELECT … FROM scores"')
    print(query.render(table, args.format))
    return 0


def report_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, " (a scoring config: its output, model and storage are read)")
    p.add_argument("--run", help="scoring run id (as in <output>/_runs/), or 'latest'")
    p.add_argument("--output", help="scores root the run wrote to (local or s3://; = --set output=…)")
    p.add_argument("--artifact", help="model artifact: (re)build its training report instead")
    p.add_argument("--model", help="model artifact for heatmaps (default: the one the run used)")
    p.add_argument("--top", type=int, default=12, help="images in the top-cracks gallery (default 12)")
    add_storage_flag(p)


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale.reports import scoring, training

    cfg = scoring_config(args, {"output": args.output, "model": args.model})
    if args.artifact:
        return {"report": training.training_report(args.artifact, cfg.storage)}
    if not (args.run and cfg.output):
        raise ConfigError("say which report: --run RUN_ID --output SCORES_ROOT, or --artifact MODEL_DIR")
    return {"report": scoring.scoring_report(cfg.output, args.run, cfg.storage, top_n=args.top, model_uri=cfg.model)}


def doctor_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, " (a scoring config: its storage, and the bucket of its output, are checked)")
    p.add_argument(
        "--ray-address", default="", help="Ray cluster: host:6379 or http://host:8265 (default: RAY_ADDRESS)"
    )
    add_storage_flag(p)
    p.add_argument("--bucket", default="", help="also check this bucket exists (name or s3://bucket/...)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")


def cmd_doctor(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from crackscale import doctor

    cfg = scoring_config(args, {})
    bucket = args.bucket or (cfg.output if storage.is_s3(cfg.output) else "")
    checks = doctor.run(args.ray_address, cfg.storage, bucket)
    print(json.dumps([asdict(c) for c in checks], indent=1) if args.json else doctor.render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def repair_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, " (a scoring config: its output and storage are read)")
    p.add_argument("--output", help="scores root to check (local or s3://; = --set output=…)")
    add_storage_flag(p)


def cmd_repair(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale.scoring.repair import repair

    cfg = scoring_config(args, {"output": args.output})
    if not cfg.output:
        raise ConfigError("say which output to repair: --output URI (or output in --config)")
    return repair(cfg.output, cfg.storage)


def synth_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, " (a training config: synth_dir, synth_per_class, class_names, seed)")
    p.add_argument("--out", help="folder to write <class>/*.jpg into (= --set synth_dir=…; default demo/data)")
    p.add_argument("--per-class", type=int, help="images per class (= --set synth_per_class=…; default 200)")
    p.add_argument("--size", type=int, default=227, help="image side in pixels (default 227)")
    p.add_argument("--seed", type=int, help="random seed (default 0, or the config's seed)")
    p.add_argument(
        "--photos",
        type=int,
        default=0,
        help="instead of crops, write this many whole photos stitched from synthetic crops (see --grid)",
    )
    p.add_argument("--grid", default="8x6", help="crops across x down in each photo (default 8x6)")
    p.add_argument(
        "--masks",
        action="store_true",
        help="with --photos: a photo set with pixel masks (<out>/photos/*.jpg + <out>/masks/*.png) as training reads",
    )


def cmd_synth(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale.data import synth

    flags = {"synth_dir": args.out, "synth_per_class": args.per_class, "seed": args.seed}
    cfg = load(TrainConfig, args.config, list(args.set) + [f"{k}={v}" for k, v in flags.items() if v is not None])
    seed = cfg.seed if (args.config or args.set or args.seed is not None) else 0
    if args.photos:
        cols, _, rows = args.grid.partition("x")
        if not (cols.isdigit() and rows.isdigit() and int(cols) > 0 and int(rows) > 0):
            raise ConfigError(f"--grid must look like COLSxROWS, e.g. 8x6; got {args.grid!r}")
        if args.masks:
            out = synth.photo_set(cfg.synth_dir, args.photos, int(cols), int(rows), size=args.size, seed=seed)
            return {"out": str(out), "photos": args.photos}
        paths = synth.photos(cfg.synth_dir, args.photos, int(cols), int(rows), size=args.size, seed=seed)
        return {"out": str(cfg.synth_dir), "photos": [str(p) for p in paths]}
    out = synth.generate(
        cfg.synth_dir, per_class=cfg.synth_per_class, size=args.size, seed=seed, class_names=tuple(cfg.class_names)
    )  # type: ignore[arg-type]
    return {"out": str(out), "per_class": cfg.synth_per_class}


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="model artifact directory (local or s3://)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="a full-integer LiteRT model, calibrated on 200 of the artifact's training images",
    )
    p.add_argument(
        "--heatmap",
        action="store_true",
        help="the Grad-CAM heatmap model for LiteRT: scoring reports then draw heatmaps without TensorFlow",
    )
    add_config_args(p, " (a scoring config: its storage is read)")
    add_storage_flag(p)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from crackscale import artifact
    from crackscale.training.export import add_int8

    if not args.int8 and not args.heatmap:
        raise ConfigError("say which export: --int8, --heatmap or both")
    storage_cfg = scoring_config(args, {}).storage
    out: dict[str, Any] = add_int8(args.artifact, storage_cfg) if args.int8 else {"artifact": args.artifact}
    if args.heatmap:
        record = artifact.add_heatmap(args.artifact, storage_cfg)
        if record.get("error"):
            raise artifact.ArtifactError(f"heatmap export of {args.artifact} failed: {record['error']}")
        out["heatmap"] = record
    return out


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model artifact directory (local or s3://)")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="a labelled source: crop tree <uri>/<class>/ or photo set <uri>/photos + <uri>/masks (repeatable)",
    )
    p.add_argument(
        "--split",
        default="all",
        choices=("all", "train", "val", "test"),
        help="all items (a source the model never saw), or only those the artifact's manifest put in this split",
    )
    p.add_argument("--runtime", default="auto", help="auto (as scoring chooses), litert, litert-int8 or tf")
    p.add_argument("--report", default="", help="where the HTML page goes (default: evaluations/<model>-<time>)")
    p.add_argument("--max-errors", type=int, default=24, help="wrong items shown per source (default 24)")
    add_config_args(p, " (a scoring config: its storage is read)")
    add_storage_flag(p)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import datetime as dt

    from crackscale.evaluation import evaluate
    from crackscale.reports.evaluation import evaluation_report
    from crackscale.reports.page import safely

    storage_cfg = scoring_config(args, {}).storage
    summary, items = evaluate(args.model, list(args.data), args.split, args.runtime, storage_cfg)
    dest = args.report or storage.join(
        "evaluations", f"{storage.basename(args.model)}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    summary["report"] = safely(evaluation_report, summary, items, dest, storage_cfg, args.max_errors)
    return summary


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]]] = {
    "train": (train_arguments, cmd_train),
    "synth": (synth_arguments, cmd_synth),
    "score": (score_arguments, cmd_score),
    "query": (query_arguments, cmd_query),
    "tune": (tune_arguments, cmd_tune),
    "report": (report_arguments, cmd_report),
    "doctor": (doctor_arguments, cmd_doctor),
    "repair": (repair_arguments, cmd_repair),
    "export": (export_arguments, cmd_export),
    "evaluate": (evaluate_arguments, cmd_evaluate),
}


# ---- running ------------------------------------------------------------------------------------


def run_guarded(fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``fn``; print its JSON summary last, or one clear error line (exit 2)."""
    try:
        result = fn(args)
    except USER_ERRORS as e:
        # raised in a Ray task or actor: Ray's error carries the cause, with a traceback in its text
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
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


def _epilog(command: str) -> str:
    return "\n  ".join(["examples:", EXAMPLES[command], *MORE_EXAMPLES.get(command, [])])


def command_parser(command: str, prog: str) -> argparse.ArgumentParser:
    """A stand-alone parser for one command (``jobs/<command>.py``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=HELP[command],
        epilog=_epilog(command),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    COMMANDS[command][0](p)
    p.set_defaults(func=COMMANDS[command][1], verbose=False)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crackscale",
        description="Distributed crack detection on Ray: train, tune, score, query.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (arguments, func) in COMMANDS.items():
        p = sub.add_parser(
            command, help=HELP[command], epilog=_epilog(command), formatter_class=argparse.RawDescriptionHelpFormatter
        )
        arguments(p)
        p.set_defaults(func=func)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: list[str] | None = None) -> int:
    """``crackscale …``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_guarded(args.func, args)


def job_main(command: str, argv: list[str] | None = None) -> int:
    """``python jobs/<command>.py …``: the command's own arguments, the same function as ``crackscale``."""
    args = command_parser(command, f"jobs/{command}.py").parse_args(argv)
    setup_logging()
    return run_guarded(args.func, args)


def exit_process(rc: int) -> NoReturn:
    """End a command's process with ``rc``: it leaves Ray (a private Ray stops), the exit hooks run
    now, the streams are flushed, and the process ends without Python tearing down every module it
    imported, which for Ray, Arrow, DuckDB and matplotlib takes about half a second and writes
    nothing. Only a script's last line calls this, never a process that goes on."""
    import atexit
    import os

    from crackscale import raysession

    raysession.disconnect()
    atexit._run_exitfuncs()  # CPython's runner of the registered hooks; tests/test_paths.py checks they run
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(rc)


def console() -> NoReturn:
    """The ``crackscale`` command."""
    exit_process(main())


if __name__ == "__main__":
    exit_process(main())
