"""The one place that decides how a job reaches Ray.

Under ``ray job submit``, with ``RAY_ADDRESS`` set, or with a ``ray start`` cluster on this machine,
``ray.init()`` attaches to that cluster. ``RAY_ADDRESS=local`` starts a private Ray for this job
only; ``dashboard`` then says whether it runs a dashboard (None: Ray's default).
"""

from __future__ import annotations

import os


def connect(dashboard: bool | None = None) -> None:
    """Attach to the cluster, or start a private Ray (``RAY_ADDRESS=local``); no-op if connected."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS", "").strip() == "local":
        ray.init(include_dashboard=dashboard)
    else:
        ray.init()
