"""Answer inspectors' questions about scoring outputs without learning the layout.

DuckDB scans the outputs as a ``pyarrow.dataset`` (hive partitions ``model_id``/``run_date``),
so the same code works on local folders and S3 (no DuckDB extensions needed, none download here),
and filters on ``run_date``/``model_id`` prune whole partitions. The view is called ``scores``.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pyarrow as pa

from crackscale import storage
from crackscale.config.loader import ConfigError
from crackscale.config.storage import StorageConfig
from crackscale.scoring.commit import PARTITIONING, SCHEMA, TILES_DIR, committed_tiles
from crackscale.scoring.tiles import TILES_SCHEMA

log = logging.getLogger(__name__)

COUNT_BY = ("night", "prefix", "model")
FORMATS = ("table", "json", "csv")


def open_scores(output: str, cfg: StorageConfig | None = None) -> Any:
    """The scores under ``output`` as a pyarrow dataset (``_staging``/``_runs`` are ignored)."""
    import pyarrow.dataset as ds

    fs, root = storage.resolve(output, cfg)
    try:
        if fs.get_file_info(root).type == 0:  # FileType.NotFound
            raise storage.StorageError(f"no scores found at {output}")
        return ds.dataset(
            root,
            filesystem=fs,
            format="parquet",
            schema=pa.unify_schemas([SCHEMA, PARTITIONING]),
            partitioning=ds.partitioning(PARTITIONING, flavor="hive"),
        )
    except OSError as e:
        raise storage.StorageError(f"cannot read scores at {output}: {e}") from None


def open_tiles(output: str, cfg: StorageConfig | None = None) -> Any:
    """The tiles of the committed chunks under ``output`` as a pyarrow dataset (a chunk's tiles
    file without its scores file, left by a killed run, is not read)."""
    import pyarrow.dataset as ds

    fs, root = storage.resolve(output, cfg)
    try:
        return ds.dataset(
            committed_tiles(output, cfg),
            filesystem=fs,
            format="parquet",
            schema=pa.unify_schemas([TILES_SCHEMA, PARTITIONING]),
            partitioning=ds.partitioning(PARTITIONING, flavor="hive"),
            partition_base_dir=f"{root.rstrip('/')}/{TILES_DIR}",
        )
    except OSError as e:
        raise storage.StorageError(f"cannot read tiles at {output}: {e}") from None


def connect(output: str, cfg: StorageConfig | None = None, all_versions: bool = False) -> Any:
    """A DuckDB connection with the views ``scores`` and ``tiles`` over ``output``. An image whose
    content changed was scored again: ``scores`` holds its latest version per model, or every
    version with ``all_versions``."""
    import duckdb

    con = duckdb.connect()
    con.register("score_rows", open_scores(output, cfg))
    con.register("tiles", open_tiles(output, cfg))
    latest = (
        ""
        if all_versions
        else " QUALIFY row_number() OVER (PARTITION BY model_id, uri ORDER BY scored_at DESC, run_id DESC) = 1"
    )
    con.execute(f"CREATE VIEW scores AS SELECT * FROM score_rows{latest}")
    return con


def _where(
    prefix: str = "", since: str = "", until: str = "", model: str = "", extra: str = ""
) -> tuple[str, list[Any]]:
    conds, params = ([extra] if extra else []), []
    if prefix:
        conds.append("starts_with(uri, ?)")
        params.append(prefix)
    if since:
        conds.append("run_date >= ?")
        params.append(since)
    if until:
        conds.append("run_date <= ?")
        params.append(until)
    if model:
        conds.append("(model_id = ? OR model_name = ?)")
        params += [model, model]
    return (" WHERE " + " AND ".join(conds)) if conds else "", params


def _run(con: Any, q: str, params: list[Any] | None = None) -> pa.Table:
    return con.sql(q, params=params or None).to_arrow_table()


def latest_model(con: Any) -> str:
    """The model of the most recent scoring (``top``'s default: one row per image)."""
    rows = _run(con, "SELECT model_id FROM scores ORDER BY run_date DESC, scored_at DESC LIMIT 1")
    return rows["model_id"][0].as_py() if rows.num_rows else ""


def top(con: Any, n: int = 20, prefix: str = "", since: str = "", until: str = "", model: str = "") -> pa.Table:
    """The ``n`` most likely cracks (by P(crack)) for one model (default: the latest)."""
    where, params = _where(prefix, since, until, model or latest_model(con), "error IS NULL")
    return _run(
        con,
        "SELECT uri, crack_probability, crack, model_id, model_name, run_date, scored_at "
        f"FROM scores{where} ORDER BY crack_probability DESC, uri LIMIT ?",
        params + [n],
    )


def counts(
    con: Any, by: str = "night", prefix: str = "", since: str = "", until: str = "", model: str = ""
) -> pa.Table:
    """Images, cracks and failures per night (run_date), per prefix (parent folder) or per model."""
    if by not in COUNT_BY:
        raise ConfigError(f"--by must be one of {', '.join(COUNT_BY)}, got {by!r}")
    key = {
        "night": "run_date, model_id",
        "prefix": "regexp_replace(uri, '[^/]*$', '') AS prefix, model_id",
        "model": "model_id, model_name",
    }[by]
    group = {"night": "run_date, model_id", "prefix": "prefix, model_id", "model": "model_id, model_name"}[by]
    where, params = _where(prefix, since, until, model)
    return _run(
        con,
        f"SELECT {key}, count(*) AS images, count(*) FILTER (WHERE crack) AS cracks, "
        f"count(error) AS failed, min(scored_at) AS first_scored, max(scored_at) AS last_scored "
        f"FROM scores{where} GROUP BY {group} ORDER BY {group}",
        params,
    )


def failed(con: Any, prefix: str = "", since: str = "", until: str = "", model: str = "", n: int = 1000) -> pa.Table:
    """Images that could not be scored, with their errors."""
    where, params = _where(prefix, since, until, model, "error IS NOT NULL")
    return _run(
        con,
        f"SELECT uri, error, size, model_id, run_date, run_id FROM scores{where} ORDER BY run_date DESC, uri LIMIT ?",
        params + [n],
    )


def photos(con: Any, n: int = 20, prefix: str = "", since: str = "", until: str = "", model: str = "") -> pa.Table:
    """The ``n`` photos scored as tiles with the most crack tiles, for one model (default: the latest)."""
    where, params = _where(prefix, since, until, model or latest_model(con), "error IS NULL AND tiles > 1")
    return _run(
        con,
        "SELECT uri, crack_tiles, tiles, crack_probability, crack, model_id, run_date "
        f"FROM scores{where} ORDER BY crack_tiles DESC, crack_probability DESC, uri LIMIT ?",
        params + [n],
    )


def tiles_of(con: Any, uri: str, model: str = "") -> pa.Table:
    """One photo's tiles (position, size, P(crack)) for one model (default: the latest)."""
    model = model or latest_model(con)
    return _run(
        con,
        "SELECT row, col, x, y, w, h, probability, model_id, run_date FROM tiles WHERE uri = ? AND model_id IN "
        "(SELECT DISTINCT model_id FROM scores WHERE model_id = ? OR model_name = ?) ORDER BY row, col",
        [uri, model, model],
    )


def sql(con: Any, query: str) -> pa.Table:
    """Any read-only SQL over the view ``scores``."""
    import duckdb

    try:
        return _run(con, query)
    except duckdb.Error as e:
        raise ConfigError(f"--sql failed: {str(e).splitlines()[0]}") from None


def render(table: pa.Table, fmt: str = "table") -> str:
    """``table`` (aligned text), ``json`` (a list of objects) or ``csv``."""
    if fmt == "json":
        return json.dumps(table.to_pylist(), default=str, indent=1)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        buf = io.BytesIO()
        pcsv.write_csv(table, buf)
        return buf.getvalue().decode()
    rows = [
        [("" if v is None else f"{v:.6f}" if isinstance(v, float) else str(v)) for v in r.values()]
        for r in table.to_pylist()
    ]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(table.column_names)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(table.column_names), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out + [f"({table.num_rows} rows)"])
