"""One storage API for local paths and S3-compatible object stores (AWS S3, MinIO, Ceph).

Files and folders go through ``pyarrow.fs`` so Ray Data, pyarrow datasets and DuckDB see the same
filesystem. Scoring lists S3 prefixes with boto3's paginator and reads each image with one boto3
``get_object`` (:func:`read_object`; pyarrow's streams send a HEAD first), both through
:func:`s3_client`, bounded like :func:`s3_filesystem`. The endpoint comes from config, else
``AWS_ENDPOINT_URL``; credentials always come from the standard AWS chain (env, ~/.aws, instance
role) and are never stored or logged.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from crackscale.config.storage import StorageConfig
from crackscale.errors import first_line

log = logging.getLogger(__name__)

LIST_CHUNK = 65536  # names per arrow array while a folder is read


class StorageError(RuntimeError):
    """A storage location is missing, unreachable or denied; the message names it."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with '/' (local paths stay local)."""
    if is_s3(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])
    return str(Path(base, *parts))


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    region: str

    @classmethod
    def resolve(cls, cfg: StorageConfig | None = None) -> S3Settings:
        cfg = cfg or StorageConfig()
        endpoint = cfg.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
        region = cfg.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(endpoint=endpoint, region=region)

    def describe(self) -> str:
        return self.endpoint or "AWS S3"


def s3_filesystem(cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for the configured endpoint, with bounded retries and timeouts."""
    s = S3Settings.resolve(cfg)
    kwargs: dict = dict(
        region=s.region,
        connect_timeout=5,
        request_timeout=30,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=5),
    )
    if s.endpoint:
        u = urlparse(s.endpoint)
        if not u.scheme or not u.netloc:
            raise StorageError(f"S3 endpoint {s.endpoint!r} must look like http(s)://host:port")
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme, force_virtual_addressing=False)
    return pafs.S3FileSystem(**kwargs)


_S3_CLIENTS: dict = {}


def s3_client(cfg: StorageConfig | None = None, pool: int = 10):
    """One boto3 S3 client per (config, pool size) per process (boto3 clients are thread-safe),
    with the same bounds as :func:`s3_filesystem`: 5 attempts in standard retry mode, 5 s to
    connect, 30 s per read. ``pool`` is the most connections it keeps open."""
    key = (cfg, pool)
    if key not in _S3_CLIENTS:
        import boto3
        import botocore.config

        s = S3Settings.resolve(cfg)
        config = botocore.config.Config(
            retries={"total_max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=pool,
        )
        _S3_CLIENTS[key] = boto3.client("s3", endpoint_url=s.endpoint or None, region_name=s.region, config=config)
    return _S3_CLIENTS[key]


def resolve(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://bucket/key`` URI."""
    if is_s3(uri):
        rest = uri[len("s3://") :].strip("/")
        if not rest:
            raise StorageError(f"S3 URI {uri!r} names no bucket")
        return s3_filesystem(cfg), rest
    if "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def wrap_error(uri: str, cfg: StorageConfig | None, e: Exception) -> StorageError:
    """A StorageError naming ``uri`` (and the S3 endpoint) with the first line of ``e``."""
    where = f" (endpoint {S3Settings.resolve(cfg).describe()})" if is_s3(uri) else ""
    msg = first_line(e)
    return StorageError(f"cannot access {uri}{where}: {msg}")


def info(uri: str, cfg: StorageConfig | None = None) -> pafs.FileInfo:
    fs, path = resolve(uri, cfg)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise wrap_error(uri, cfg, e) from None


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    return info(uri, cfg).type != pafs.FileType.NotFound


def list_files(
    uri: str, extensions: tuple[str, ...] | None = None, cfg: StorageConfig | None = None
) -> Iterator[pafs.FileInfo]:
    """Files under ``uri`` (recursive), filtered by lower-cased extension, sorted by path."""
    fs, path = resolve(uri, cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=False))
    except FileNotFoundError:
        raise StorageError(f"data path not found: {uri}") from None
    except OSError as e:
        raise wrap_error(uri, cfg, e) from None
    exts = tuple(e.lower() for e in extensions) if extensions else None
    for fi in sorted(infos, key=lambda f: f.path):
        if fi.type != pafs.FileType.File:
            continue
        if exts and not fi.path.lower().endswith(exts):
            continue
        yield fi


def iter_uri_batches(
    uri: str, extensions: tuple[str, ...] | None = None, cfg: StorageConfig | None = None
) -> Iterator[pa.Array]:
    """The URIs :func:`list_files` names, in the same order (sorted by path), as arrow string
    arrays: a local tree is walked and sorted one directory at a time in arrow, S3 is read one
    ListObjectsV2 page at a time, so listing millions of files never holds them as Python objects."""
    exts = tuple(e.lower() for e in extensions) if extensions else None

    def wanted(names: pa.Array) -> pa.Array:
        if not exts:
            return names
        lower = pc.utf8_lower(names)
        keep = pc.ends_with(lower, exts[0])
        for e in exts[1:]:
            keep = pc.or_(keep, pc.ends_with(lower, e))
        return names.filter(keep)

    if is_s3(uri):
        import botocore.exceptions

        bucket, _, prefix = resolve(uri, cfg)[1].partition("/")
        pages = s3_client(cfg).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix and prefix + "/")
        try:
            for page in pages:  # keys come in UTF-8 byte order, which is the order of sorted paths
                keys = pa.array([o["Key"] for o in page.get("Contents", [])], pa.string())
                keys = wanted(keys.filter(pc.invert(pc.ends_with(keys, "/"))))
                if len(keys):
                    yield pc.binary_join_element_wise(f"s3://{bucket}/", keys, "")
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise wrap_error(uri, cfg, e) from None
        return
    root = resolve(uri, cfg)[1]
    if not os.path.isdir(root):
        raise StorageError(f"data path not found: {uri}")

    def walk(d: str) -> Iterator[pa.Array]:
        # a folder's entries ordered as their full paths sort: everything under folder "a" is
        # "a/...", so it sorts as "a/"; arrow compares UTF-8 bytes, which is code-point order
        chunks, chunk = [], []
        with os.scandir(d) as it:
            for e in it:
                chunk.append(e.name + "/" if e.is_dir() else e.name)
                if len(chunk) == LIST_CHUNK:
                    chunks.append(pa.array(chunk, pa.string()))
                    chunk = []
        chunks.append(pa.array(chunk, pa.string()))
        names = pa.concat_arrays(chunks)
        del chunks, chunk
        names = names.take(pc.array_sort_indices(names))
        # runs of files between sub-folders go out as arrays, each folder's files at the point
        # its name sorts
        start = 0
        for i in [*pc.indices_nonzero(pc.ends_with(names, "/")).to_pylist(), len(names)]:
            files = wanted(names.slice(start, i - start))
            if len(files):
                yield pc.binary_join_element_wise(d.rstrip("/") + "/", files, "")
            if i < len(names):
                yield from walk(os.path.join(d, names[i].as_py().rstrip("/")))
            start = i + 1

    yield from walk(root)


def uri_of(base_uri: str, fs_path: str) -> str:
    """The user-facing URI of ``fs_path`` as returned by the filesystem of ``base_uri``."""
    return "s3://" + fs_path.lstrip("/") if is_s3(base_uri) else fs_path


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = resolve(uri, cfg)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except OSError as e:
        raise wrap_error(uri, cfg, e) from None


def read_many(uris: list[str], cfg: StorageConfig | None = None, threads: int = 16) -> list[bytes]:
    """Read many small objects concurrently (S3 latency dominates, not bandwidth)."""
    if not uris:
        return []
    fs, _ = resolve(uris[0], cfg)  # one filesystem (one S3 client) for all reads

    def one(u: str) -> bytes:
        path = u[len("s3://") :] if is_s3(u) else str(Path(u).expanduser().absolute())
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except OSError as e:
            raise wrap_error(u, cfg, e) from None

    with ThreadPoolExecutor(max_workers=threads if is_s3(uris[0]) else 4) as pool:
        return list(pool.map(one, uris))


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write a whole object. Local writes are atomic (temp file + rename); S3 PUTs are atomic."""
    write_chunks(uri, [data], cfg)


def write_chunks(uri: str, chunks: Iterable[bytes], cfg: StorageConfig | None = None) -> None:
    """Write an object from ``chunks`` as they come (never all in memory), as atomically as
    :func:`write_bytes`."""
    fs, path = resolve(uri, cfg)
    try:
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                for chunk in chunks:
                    f.write(chunk)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise wrap_error(uri, cfg, e) from None


def write_text(uri: str, text: str, cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode(), cfg)


def read_text(uri: str, cfg: StorageConfig | None = None) -> str:
    return read_bytes(uri, cfg).decode()


def upload_dir(local_dir: str | Path, uri: str, cfg: StorageConfig | None = None) -> None:
    """Copy a local directory tree to ``uri`` (local or S3)."""
    fs, path = resolve(uri, cfg)
    try:
        if not is_s3(uri):
            shutil.copytree(local_dir, path, dirs_exist_ok=True)
            return
        pafs.copy_files(str(Path(local_dir).absolute()), path, destination_filesystem=fs)
    except OSError as e:
        raise wrap_error(uri, cfg, e) from None


def download_dir(uri: str, local_dir: str | Path | None = None, cfg: StorageConfig | None = None) -> Path:
    """A local copy of directory ``uri``; a local directory is returned as it is."""
    if not is_s3(uri):
        p = Path(uri).expanduser()
        if not p.is_dir():
            raise StorageError(f"directory not found: {uri}")
        return p
    fs, path = resolve(uri, cfg)
    dest = Path(local_dir or tempfile.mkdtemp(prefix="crackscale-"))
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise StorageError(f"directory not found: {uri}")
        pafs.copy_files(path, str(dest), source_filesystem=fs)
    except OSError as e:
        raise wrap_error(uri, cfg, e) from None
    return dest


def check_bucket(uri: str, cfg: StorageConfig | None = None) -> None:
    """Fail fast, with the endpoint named, if the bucket of ``uri`` is unreachable or missing."""
    if not is_s3(uri):
        return
    bucket = uri[len("s3://") :].split("/", 1)[0]
    fi = info(f"s3://{bucket}", cfg)
    if fi.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket not found: s3://{bucket} (endpoint {S3Settings.resolve(cfg).describe()})")


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


# ---- object reads for scoring (one GET each, per-object errors, transient faults retried) ----


# answers about the credentials, not the object: every later request gets the same
CREDENTIAL_ERRORS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "TokenRefreshRequired",
    "InvalidToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
)


class CredentialsError(StorageError):
    """The endpoint refused the credentials themselves: the run stops, no image is marked failed."""


# An image row's error that is the run's failure, not the image's: the driver stops the run with it
# and never commits the row's chunk (raised in a Ray worker, an exception would reach the driver
# wrapped in Ray's own, its type lost).
RUN_FAILURE = "run failure: "


def get_object(uri: str, cfg: StorageConfig | None = None, pool: int = 10) -> bytes:
    """An S3 object's bytes in one GET (pyarrow's streams send a HEAD first: twice the requests).

    Raises FileNotFoundError (no such key), PermissionError or ValueError (an answer about the
    object: its error row), CredentialsError (expired or wrong credentials: the run's failure), or
    OSError (transient: throttling, 5xx, connection lost)."""
    import botocore.exceptions as bx
    import urllib3.exceptions

    bucket, _, key = uri[len("s3://") :].partition("/")
    try:
        client = s3_client(cfg, pool=pool)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except bx.ClientError as e:
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        code, status = str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)
        msg = f"{code or status}: {err.get('Message') or e}"
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            raise FileNotFoundError(uri) from None
        if code in CREDENTIAL_ERRORS:
            raise CredentialsError(
                f"credentials refused by the S3 endpoint {S3Settings.resolve(cfg).describe()} ({msg}); "
                "renew or fix them and run again: the chunks not committed are scored then"
            ) from None
        if code in ("AccessDenied", "403") or status == 403:
            raise PermissionError(f"ACCESS_DENIED {msg}") from None
        if status >= 500 or status == 429 or "SlowDown" in code or "Throttl" in code or not status:
            raise OSError(msg) from None
        raise ValueError(msg) from None  # 400, InvalidObjectState, …: about this object
    except (bx.BotoCoreError, urllib3.exceptions.HTTPError, ConnectionError) as e:  # refused, reset, timeout, cut body
        raise OSError(f"{type(e).__name__}: {e}") from None


def read_object(uri: str, cfg: StorageConfig | None = None, attempts: int = 3, pool: int = 10) -> bytes | str:
    """The object's bytes, or an error string (missing/denied object).

    A transient S3 failure (throttling, 5xx, connection reset, timeout) that outlasts the
    client's own retries is retried ``attempts`` times with backoff and then raised: it fails
    the task, and so the run, instead of marking a good image as failed forever (the commit
    protocol would never score it again).
    """
    import time

    for attempt in range(attempts):
        try:
            if is_s3(uri):
                return get_object(uri, cfg, pool)
            fs, path = resolve(uri)
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return "read: not found"
        except CredentialsError:
            raise
        except Exception as e:  # permanent (denied, invalid key, local I/O): this image's error row
            msg = first_line(e)
            transient = isinstance(e, OSError) and not isinstance(e, PermissionError)
            if not is_s3(uri) or not transient:  # get_object raises OSError only for transient faults
                return f"read: {msg}"
            if attempt + 1 == attempts:
                raise StorageError(
                    f"cannot read {uri} (endpoint {S3Settings.resolve(cfg).describe()}) "
                    f"after {attempts} rounds "
                    f"of retries: {msg}"
                ) from None
            time.sleep(2**attempt)
    raise AssertionError("unreachable")
