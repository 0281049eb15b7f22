"""The one place that decides how a job reaches Ray.

Under ``ray job submit``, with ``RAY_ADDRESS`` set, or with a ``ray start`` cluster on this machine,
``ray.init()`` attaches to that cluster. ``RAY_ADDRESS=local`` starts a private Ray for this job
only; ``dashboard`` then says whether it runs a dashboard (None: Ray's default).
"""

from __future__ import annotations

import atexit
import os

from crackscale.config.loader import ConfigError


def connect(dashboard: bool | None = None) -> None:
    """Attach to the cluster, or start a private Ray (``RAY_ADDRESS=local``); no-op if connected."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS", "").strip() == "local":
        ray.init(include_dashboard=dashboard)
        atexit.register(stop_autoscaler_monitor)  # runs before Ray's own exit hook (registered at import)
    else:
        ray.init()


def disconnect() -> None:
    """Leave Ray at a command's end (a private Ray stops; a cluster goes on). Ray's own exit hook
    does the same after sleeping half a second for late worker log lines, which a finished job no
    longer needs."""
    import ray

    if ray.is_initialized():
        stop_autoscaler_monitor()
        ray.shutdown()


def stop_autoscaler_monitor() -> bool:
    """SIGKILL the autoscaler monitor of the private Ray this process started; whether it did.

    Ray's exit hook stops a private Ray's processes in turn, the GCS before the monitor, and
    gives each a second to exit after SIGTERM. The monitor's SIGTERM handler first reports its
    end to the GCS, which is gone by then, so it never exits by itself: without this, every job
    would wait that second at exit. On a single-node private Ray the monitor has nothing to scale and no state.
    This is the one place that uses Ray internals (``_global_node``, ``Node.kill_monitor``);
    ``tests/test_paths.py::test_a_private_ray_stops_without_waiting_for_its_monitor`` fails if
    they change."""
    import ray

    node = ray._private.worker._global_node
    if node is None or not ray.is_initialized():
        return False
    alive = [p for p in node.all_processes.get("monitor", []) if p.process.poll() is None]
    node.kill_monitor(check_alive=False)  # without allow_graceful: SIGKILL, then reaped
    return bool(alive)


HOME_ENV = "CRACKSCALE_HOME"  # the base of relative output paths, where the working directory is not the user's


def durable(path: str, key: str) -> str:
    """Where an output path lands, resolved once, in the driver: an ``s3://`` URI or an absolute
    path as it is; a relative path under ``$CRACKSCALE_HOME`` when set, else under the current
    directory. Under ``ray job submit`` the current directory is Ray's temporary copy of the
    project, deleted once unused, so there a relative path without ``CRACKSCALE_HOME`` is refused
    with one line saying what to set (``key``: the config key, for that line)."""
    if not path or "://" in path:
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    home = os.environ.get(HOME_ENV, "").strip()
    if home:
        return os.path.join(os.path.abspath(os.path.expanduser(home)), path)
    if os.environ.get(_JOB_SUBMISSION_ENV):
        raise ConfigError(
            f"config key '{key}' is the relative path {path!r}: under `ray job submit` it would land in Ray's "
            "temporary copy of the working directory, which Ray deletes; give an absolute path or an s3:// URI, "
            f'or set {HOME_ENV} in the job\'s runtime env (--runtime-env-json \'{{"env_vars": {{"{HOME_ENV}": '
            '"/data/crackscale"}}}}\')'
        )
    return os.path.abspath(path)


# set by Ray's job supervisor in the environment of a submitted job's driver
_JOB_SUBMISSION_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
