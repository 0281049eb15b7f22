"""Secrets never leak: recognisable fake S3 credentials and a fake Ray token are set the ways users
set them (environment variables, then a ``~/.aws/credentials`` profile), a tiny training run reads
its data from the S3 server and tiny scoring runs write Parquet to it; then every output is
searched for them as a user reads it: the artifact and run storage, the Parquet files decoded by
pyarrow (and their raw bytes), run summaries and reports on S3, job stdout/stderr, and every file of
the Ray sessions (logs included)."""

from __future__ import annotations

import io
import json
import os
import tempfile
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import files_under, last_json, run_job, upload_tree

pytestmark = pytest.mark.slow

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEREL1AB1L1TY7",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretRel1ab1l1ty/Zq9xW2vK7pL0mN3bV5cX8zA+Q",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzFakeSessionTokenRel1ab1l1tyQ2hLm9",
    "RAY_AUTH_TOKEN": "f4ke0ray0token0rel1ab1l1ty0000000000000000000000",
}


FILE_SECRETS = {  # in ~/.aws/credentials for the second scoring run
    "aws_access_key_id": "AKIAFAKEPROF1LE0KEY7",
    "aws_secret_access_key": "fakeProfileSecretRel1ab1l1ty/Kq2wE4rT6yU8iO0p",
}


def needles() -> list[bytes]:
    out = []
    for v in [*SECRETS.values(), *FILE_SECRETS.values()]:
        out += [v.encode(), urllib.parse.quote(v, safe="").encode()]
        out.append(v[8:28].encode())  # a fragment: a truncated or re-wrapped copy still counts
    return sorted(set(out))


def leaks(blob: bytes) -> list[str]:
    return [n.decode() for n in needles() if n in blob]


def test_no_secret_in_any_output_or_log(s3_server, s3_bucket, synth_data, tmp_path):
    import boto3

    ray_tmp = Path("/tmp") / f"rs-{os.getpid()}-{tmp_path.name[-6:]}"  # short: Ray's socket paths
    home = Path("/nonexistent")
    env = dict(os.environ, **SECRETS, RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS="local")
    try:
        n = upload_tree(s3_server, synth_data / "Positive", s3_bucket, "data/Positive")
        n += upload_tree(s3_server, synth_data / "Negative", s3_bucket, "data/Negative")
        assert n > 0
        runs = tmp_path / "runs"
        train = run_job(
            [
                "jobs/train.py",
                "--config",
                "jobs/configs/demo.yaml",
                "--set",
                f"data=s3://{s3_bucket}/data",
                "--set",
                f"storage_path={runs}",
                "--set",
                "name=secret",
                "--set",
                "head_epochs=1",
                "--set",
                "fine_tune_epochs=0",
                "--set",
                "min_epochs=0",
                "--set",
                "limit_per_class=30",
                "--set",
                "image_size=64",
                "--set",
                "weights=none",
            ],
            env=env,
            timeout=900,
        )
        assert train.returncode == 0, train.stderr[-4000:]
        artifact = runs / "secret" / "model"
        assert (artifact / "model.json").is_file()
        assert last_json(train.stdout)["data"]  # it really read the S3 data

        out = f"s3://{s3_bucket}/scores"
        score = run_job(
            [
                "jobs/score.py",
                "--model",
                str(artifact),
                "--input",
                f"s3://{s3_bucket}/data/Negative/",
                "--output",
                out,
                "--set",
                "batch_size=16",
                "--set",
                "runtime=tf",
                "--set",
                f"cache_dir={tmp_path / 'cache'}",
            ],
            env=env,
            timeout=900,
        )
        assert score.returncode == 0, score.stderr[-4000:]
        s = last_json(score.stdout)
        assert s["scored"] > 0

        found: dict[str, list[str]] = {}
        for name, blob in (
            ("train stdout+stderr", (train.stdout + train.stderr).encode()),
            ("score stdout+stderr", (score.stdout + score.stderr).encode()),
        ):
            if leaks(blob):
                found[name] = leaks(blob)
        s3 = boto3.client("s3", endpoint_url=s3_server)
        written = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="scores/").get("Contents", [])]
        assert any(k.endswith(".parquet") for k in written) and any("/_runs/" in k for k in written)
        # the same job with the credentials in a profile, as on a workstation
        home = Path(tempfile.mkdtemp(prefix="home-"))  # not searched: it holds the profile's secrets
        (home / ".aws").mkdir(parents=True)
        (home / ".aws" / "credentials").write_text(
            "[default]\n" + "".join(f"{k} = {v}\n" for k, v in FILE_SECRETS.items())
        )
        env2 = {k: v for k, v in env.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"}
        env2.update(HOME=str(home), AWS_EC2_METADATA_DISABLED="true")
        score2 = run_job(
            [
                "jobs/score.py",
                "--model",
                str(artifact),
                "--input",
                f"s3://{s3_bucket}/data/Positive/",
                "--output",
                f"s3://{s3_bucket}/scores2",
                "--set",
                f"storage.s3_endpoint={s3_server}",
                "--set",
                f"cache_dir={tmp_path / 'cache'}",
            ],
            env=env2,
            timeout=900,
        )
        assert score2.returncode == 0, score2.stderr[-4000:]
        assert last_json(score2.stdout)["scored"] > 0
        if leaks((score2.stdout + score2.stderr).encode()):
            found["score (profile) stdout+stderr"] = leaks((score2.stdout + score2.stderr).encode())
        written += [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="scores2/").get("Contents", [])]
        assert any(k.endswith(".html") for k in written)  # the scoring reports are searched too
        for key in written:
            body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            if key.endswith(".parquet"):  # compressed pages hide text from a byte search: decode them
                table = pq.read_table(io.BytesIO(body))
                body += json.dumps(table.to_pylist(), default=str).encode()
            if leaks(body):
                found[f"s3://{s3_bucket}/{key}"] = leaks(body)
        session_files = files_under(ray_tmp)
        assert any("logs" in p.parts for p in session_files), "no Ray session logs found to search"
        searched = files_under(tmp_path) + session_files
        assert len(searched) > 20
        for p in searched:
            try:
                blob = p.read_bytes()
            except OSError:
                continue
            if leaks(blob):
                found[str(p)] = leaks(blob)
        assert not found, f"secrets leaked into: {found}"
        # the search itself works: a file that holds a secret is found
        assert leaks(f"token={SECRETS['RAY_AUTH_TOKEN']}".encode())
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
