"""The listed blocks as a Ray Data Dataset, built from Ray's internals (the one place this package
reaches into them; ``tests/test_score.py::test_listed_blocks_become_a_dataset_without_metadata_tasks``
fails when a Ray upgrade moves them).

``ray.data.from_arrow_refs`` runs one remote task per block to learn its row count and schema; the
listing thread computes that metadata where the table is, so the plan is built here directly and
the model actors do not wait for those tasks (each worker running one first imports ``ray.data``)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def block_metadata(table: pa.Table) -> Any:
    """Ray Data's metadata of a block of keys, computed where the table is."""
    from ray.data._internal.util import get_table_block_metadata_schema

    return get_table_block_metadata_schema(table)


def dataset(blocks: list[tuple[Any, Any]]) -> Any:
    """The Dataset of listed (block ref, metadata) pairs: the plan ``from_arrow_refs`` builds."""
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.from_operators import FromArrow
    from ray.data._internal.stats import DatasetStats
    from ray.data.context import DataContext
    from ray.data.dataset import MaterializedDataset

    refs, metas = [r for r, _ in blocks], [m for _, m in blocks]
    stats = DatasetStats(metadata={"FromArrow": metas}, parent=None)
    context = DataContext.get_current().copy()
    return MaterializedDataset(LogicalPlan(FromArrow(refs, metas), context), context, stats)
