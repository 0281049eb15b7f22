"""crackscale.query over scoring outputs on local disk and on the S3 server (DuckDB + pyarrow)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pyarrow as pa
import pytest
from conftest import last_json, run_job  # noqa: F401

from crackscale import query, score

T0 = dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.timezone.utc)


def _chunk(uris: list[str], probs: list[float | None], errors: list[str | None], model_name: str) -> pa.Table:
    n = len(uris)
    return pa.table({
        "uri": uris, "size": [1000] * n, "etag": [None] * n, "mtime": [T0] * n,
        "crack_probability": pa.array(probs, pa.float32()),
        "crack": [None if p is None else p >= 0.5 for p in probs],
        "threshold": pa.array([0.5] * n, pa.float32()), "model_name": [model_name] * n,
        "runtime": ["litert"] * n, "run_id": ["r1"] * n, "scored_at": [T0] * n, "error": errors,
    }, schema=score.SCHEMA)


def write_fixture_scores(output: str) -> None:
    """Two nights, two sites, two models, one failure: known answers for every query."""
    b = output.rstrip("/") + "-images"
    site_a = [f"{b}/site-a/{i}.jpg" for i in range(4)]
    site_b = [f"{b}/site-b/{i}.jpg" for i in range(3)]
    score.commit_chunk(_chunk(site_a, [0.9, 0.2, 0.7, None], [None, None, None, "decode: not an image"], "m"),
                       output, "aaaa000000000001", "2026-11-20", None)
    score.commit_chunk(_chunk(site_b, [0.95, 0.1, 0.6], [None] * 3, "m"), output, "aaaa000000000001",
                       "2026-11-21", None)
    score.commit_chunk(_chunk(site_a + site_b, [0.01] * 7, [None] * 7, "m2"), output, "bbbb000000000002",
                       "2026-11-22", None)


def check_queries(output: str) -> None:
    con = query.connect(output)
    # top: default model is the latest one (m2); an explicit model gives its ranking
    top = query.top(con, n=3, model="aaaa000000000001")
    assert [u.rsplit("/", 2)[-2:] for u in top["uri"].to_pylist()] == [["site-b", "0.jpg"], ["site-a", "0.jpg"],
                                                                       ["site-a", "2.jpg"]]
    assert set(query.top(con, n=100)["model_id"].to_pylist()) == {"bbbb000000000002"}
    pre = output.rstrip("/") + "-images/site-a/"
    assert query.top(con, n=5, prefix=pre, model="m")["uri"].to_pylist()[0].endswith("site-a/0.jpg")
    dated = query.top(con, n=10, since="2026-11-21", until="2026-11-21", model="m")
    assert dated.num_rows == 3 and set(dated["run_date"].to_pylist()) == {"2026-11-21"}
    nights = query.counts(con, "night").to_pylist()
    assert [(r["run_date"], r["images"], r["cracks"], r["failed"]) for r in nights] == [
        ("2026-11-20", 4, 2, 1), ("2026-11-21", 3, 2, 0), ("2026-11-22", 7, 0, 0)]
    prefixes = {(r["prefix"].rsplit("/", 2)[-2], r["model_id"]): r["images"] for r in query.counts(con, "prefix").to_pylist()}
    assert prefixes == {("site-a", "aaaa000000000001"): 4, ("site-b", "aaaa000000000001"): 3,
                        ("site-a", "bbbb000000000002"): 4, ("site-b", "bbbb000000000002"): 3}
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
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    query.add_cli(sub)
    score.add_cli(sub)
    args = p.parse_args(["query", "counts", "--output", "x", "--by", "prefix"])
    assert args.func is query.cmd_query and args.by == "prefix"
    args = p.parse_args(["score", "--model", "m", "--input", "i", "--output", "o", "--set", "batch_size=8"])
    cfg = score.config_from_args(args)
    assert (cfg.model, cfg.input, cfg.output, cfg.batch_size) == ("m", "i", "o", 8)
    with pytest.raises(Exception, match="batch_sizee"):
        score.config_from_args(p.parse_args(["score", "--set", "batch_sizee=8"]))
