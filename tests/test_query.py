"""crackscale.query over scoring outputs on local disk and on the S3 server (DuckDB + pyarrow)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pyarrow as pa
import pytest
from conftest import last_json, run_job  # noqa: F401

from crackscale import query
from crackscale.scoring import commit

T0 = dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC)


def _chunk(
    uris: list[str], probs: list[float | None], errors: list[str | None], model_name: str, tiles: bool = True
) -> pa.Table:
    """Score rows; ``tiles=False``: as written before the tiles columns existed (they read as null)."""
    n = len(uris)
    counts = {"tiles": [1 if p is not None else None for p in probs]}
    counts["crack_tiles"] = [None if p is None else int(p >= 0.5) for p in probs]
    schema = commit.SCHEMA if tiles else pa.schema([f for f in commit.SCHEMA if f.name not in counts])
    return pa.table(
        {
            "uri": uris,
            "size": [1000] * n,
            "etag": [None] * n,
            "mtime": [T0] * n,
            "crack_probability": pa.array(probs, pa.float32()),
            "crack": [None if p is None else p >= 0.5 for p in probs],
            "threshold": pa.array([0.5] * n, pa.float32()),
            "model_name": [model_name] * n,
            "runtime": ["litert"] * n,
            "run_id": ["r1"] * n,
            "scored_at": [T0] * n,
            "error": errors,
            **(counts if tiles else {}),
        },
        schema=schema,
    )


def write_fixture_scores(output: str) -> None:
    """Two nights, two sites, two models, one failure: known answers for every query."""
    b = output.rstrip("/") + "-images"
    site_a = [f"{b}/site-a/{i}.jpg" for i in range(4)]
    site_b = [f"{b}/site-b/{i}.jpg" for i in range(3)]
    commit.commit_chunk(
        _chunk(site_a, [0.9, 0.2, 0.7, None], [None, None, None, "decode: not an image"], "m", tiles=False),
        output,
        "aaaa000000000001",
        "2026-11-20",
        None,
    )
    commit.commit_chunk(
        _chunk(site_b, [0.95, 0.1, 0.6], [None] * 3, "m"), output, "aaaa000000000001", "2026-11-21", None
    )
    commit.commit_chunk(
        _chunk(site_a + site_b, [0.01] * 7, [None] * 7, "m2"), output, "bbbb000000000002", "2026-11-22", None
    )


def check_queries(output: str) -> None:
    con = query.connect(output)
    # top: default model is the latest one (m2); an explicit model gives its ranking
    top = query.top(con, n=3, model="aaaa000000000001")
    assert [u.rsplit("/", 2)[-2:] for u in top["uri"].to_pylist()] == [
        ["site-b", "0.jpg"],
        ["site-a", "0.jpg"],
        ["site-a", "2.jpg"],
    ]
    assert set(query.top(con, n=100)["model_id"].to_pylist()) == {"bbbb000000000002"}
    pre = output.rstrip("/") + "-images/site-a/"
    assert query.top(con, n=5, prefix=pre, model="m")["uri"].to_pylist()[0].endswith("site-a/0.jpg")
    dated = query.top(con, n=10, since="2026-11-21", until="2026-11-21", model="m")
    assert dated.num_rows == 3 and set(dated["run_date"].to_pylist()) == {"2026-11-21"}
    nights = query.counts(con, "night").to_pylist()
    assert [(r["run_date"], r["images"], r["cracks"], r["failed"]) for r in nights] == [
        ("2026-11-20", 4, 2, 1),
        ("2026-11-21", 3, 2, 0),
        ("2026-11-22", 7, 0, 0),
    ]
    prefixes = {
        (r["prefix"].rsplit("/", 2)[-2], r["model_id"]): r["images"] for r in query.counts(con, "prefix").to_pylist()
    }
    assert prefixes == {
        ("site-a", "aaaa000000000001"): 4,
        ("site-b", "aaaa000000000001"): 3,
        ("site-a", "bbbb000000000002"): 4,
        ("site-b", "bbbb000000000002"): 3,
    }
    models = query.counts(con, "model").to_pylist()
    assert [(r["model_name"], r["images"]) for r in models] == [("m", 7), ("m2", 7)]
    bad = query.failed(con).to_pylist()
    assert len(bad) == 1 and bad[0]["error"] == "decode: not an image" and bad[0]["uri"].endswith("site-a/3.jpg")
    n = query.sql(con, "SELECT count(DISTINCT uri) AS n FROM scores WHERE model_id = 'bbbb000000000002'")
    assert n.to_pylist() == [{"n": 7}]


def test_queries_local(tmp_path):
    out = str(tmp_path / "scores")
    write_fixture_scores(out)
    (tmp_path / "scores" / "_runs").mkdir()
    (tmp_path / "scores" / "_runs" / "r1.json").write_text("{}")  # run summaries are not rows
    check_queries(out)


def test_queries_s3(s3_bucket):
    out = f"s3://{s3_bucket}/scores"
    write_fixture_scores(out)
    check_queries(out)


def test_query_cli_formats(tmp_path):
    out = str(tmp_path / "scores")
    write_fixture_scores(out)
    r = run_job(["jobs/query.py", "top", "--output", out, "--model", "m", "--n", "2", "--format", "json"])
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [round(x["crack_probability"], 2) for x in rows] == [0.95, 0.9]
    r = run_job(["jobs/query.py", "counts", "--by", "model", "--output", out, "--format", "csv"])
    assert r.returncode == 0, r.stderr
    assert [row["images"] for row in csv.DictReader(io.StringIO(r.stdout))] == ["7", "7"]
    r = run_job(["jobs/query.py", "failed", "--output", out])
    assert r.returncode == 0 and "decode: not an image" in r.stdout and "(1 rows)" in r.stdout
    r = run_job(["jobs/query.py", "--output", out, "--sql", "SELECT count(*) AS n FROM scores", "--format", "json"])
    assert json.loads(r.stdout) == [{"n": 14}]
    r = run_job(["jobs/query.py", "--output", out, "--sql", "SELECT nope FROM scores"])
    assert r.returncode == 2 and "--sql failed" in r.stderr and "Traceback" not in r.stderr
    r = run_job(["jobs/query.py", "top", "--output", str(tmp_path / "missing")])
    assert r.returncode == 2 and "no scores found" in r.stderr


def test_query_registers_in_cli():
    from crackscale import cli

    p = cli.build_parser()
    args = p.parse_args(["query", "counts", "--output", "x", "--by", "prefix"])
    assert args.func is cli.cmd_query and args.by == "prefix"
    args = p.parse_args(["score", "--model", "m", "--input", "i", "--output", "o", "--set", "batch_size=8"])
    cfg = cli.score_config(args)
    assert (cfg.model, cfg.input, cfg.output, cfg.batch_size) == ("m", "i", "o", 8)
    with pytest.raises(Exception, match="batch_sizee"):
        cli.score_config(p.parse_args(["score", "--set", "batch_sizee=8"]))


def test_every_command_reads_config_and_storage_the_same_way(tmp_path):
    """--config FILE and --set key=value on every command; query/report/doctor take output and
    storage.* from a scoring config, flags on top, unknown keys refused with the key named."""
    from crackscale import cli
    from crackscale.config.loader import ConfigError

    config = tmp_path / "score.yaml"
    config.write_text("output: s3://night/scores/\nstorage:\n  s3_endpoint: http://127.0.0.1:9\n")
    p = cli.build_parser()
    positional = {"export": ["runs/one/model", "--int8"], "evaluate": ["--model", "runs/one/model", "--data", "site-b"]}
    for command in cli.COMMANDS:
        argv = [command, *positional.get(command, []), "--config", str(config), "--set", "storage.s3_region=eu-west-1"]
        args = p.parse_args(argv)
        assert args.config == str(config) and args.set == ["storage.s3_region=eu-west-1"], command
        if command in ("export", "evaluate"):  # the artifact's storage, from the same scoring config
            assert cli.scoring_config(args, {}).storage.s3_region == "eu-west-1"
    for command in ("query", "report", "doctor"):
        args = p.parse_args([command, "--config", str(config), "--set", "storage.s3_region=eu-west-1"])
        cfg = cli.scoring_config(args, {"output": getattr(args, "output", None)})
        assert (cfg.output, cfg.storage.s3_endpoint, cfg.storage.s3_region) == (
            "s3://night/scores/",
            "http://127.0.0.1:9",
            "eu-west-1",
        ), command
        args = p.parse_args([command, "--config", str(config), "--s3-endpoint", "http://127.0.0.1:7"])
        assert cli.scoring_config(args, {}).storage.s3_endpoint == "http://127.0.0.1:7", command
        with pytest.raises(ConfigError, match="storage.s3_regio"):
            cli.scoring_config(p.parse_args([command, "--set", "storage.s3_regio=x"]), {})
    args = p.parse_args(["query", "top", "--config", str(config), "--output", "elsewhere/"])
    assert cli.scoring_config(args, {"output": args.output}).output == "elsewhere/"
