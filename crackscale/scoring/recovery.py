"""Surviving lost actors and nodes within a run: which failures are the cluster's (and worth a new
attempt), and ending a failed attempt so the next one is sized on the nodes that remain."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class IncompleteChunks(RuntimeError):
    """Rows of some chunks never came back (nothing of those chunks was committed)."""


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and everything in its cause chain (Ray wraps task errors in RayTaskError.cause)."""
    out: list[BaseException] = []
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    return out


def system_failure(e: BaseException) -> bool:
    """A lost actor, worker, node or object (not a bug in our code, not bad input)."""
    from ray import exceptions as rx

    lost = (
        rx.RayActorError,
        rx.ActorUnavailableError,
        rx.ObjectLostError,
        rx.WorkerCrashedError,
        rx.NodeDiedError,
        rx.RaySystemError,
        IncompleteChunks,
    )
    return any(isinstance(x, lost) for x in _causes(e))


def failed_actors(e: BaseException) -> set[str]:
    """IDs of the actors whose loss ``e`` reports."""
    from ray import exceptions as rx

    return {x.actor_id for x in _causes(e) if isinstance(x, rx.RayActorError) and x.actor_id}


def _answering_nodes(timeout_s: float) -> tuple[set[str], set[str]]:
    """(nodes that run a zero-CPU task within ``timeout_s``, nodes the cluster lists alive but do not).

    A node that was just lost stays "alive" in ``ray.nodes()`` until the cluster has missed
    enough of its health checks; only asking it tells the difference.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def node_id() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    probe = ray.remote(num_cpus=0, max_retries=0)(node_id)
    listed = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote(): i for i in listed
    }
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for r in late:
        ray.cancel(r, force=True)
    answered = set()
    for r in ready:
        try:
            answered.add(ray.get(r))
        except Exception:  # noqa: BLE001 (a node that fails the probe is not one to size a pool on)
            pass
    return answered, set(listed) - answered


def end_attempt(failed: set[str], timeout_s: float = 120.0) -> set[str]:
    """After a failed attempt: stop its model actors, find the nodes that remain; returns their IDs.

    The survivors are killed (the failed attempt's executor does not reliably do it, and one left
    alive keeps the CPU a decode task of the next attempt needs). The lost ones (``failed``) are
    not: the cluster declares them dead with their node. Then every node listed alive is asked to
    answer; one that does not is waited for (up to ``timeout_s`` in all) until the cluster declares
    it dead, so the next attempt neither sizes its pool on it nor sends tasks to it.
    """
    import gc

    import ray
    from ray._private import state  # the GCS actor table (works without a dashboard)

    gc.collect()  # drops the failed attempt's executor where only reference cycles held it
    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    core = ray._private.worker.global_worker.core_worker
    deadline = time.monotonic() + timeout_s
    killed: set[str] = set()
    while True:
        alive = {
            i
            for i, a in state.actors(job_id=job).items()
            if "Predictor" in a.get("ActorClassName", "") and a.get("State") != "DEAD"
        }
        for i in alive - failed - killed:
            ray.kill(core.get_actor_handle(ray.ActorID.from_hex(i)), no_restart=True)
            killed.add(i)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(1)
    if alive:
        log.warning("%d model actors of the failed attempt still alive after %.0f s", len(alive), timeout_s)
    answered, silent = _answering_nodes(min(30.0, max(5.0, deadline - time.monotonic())))
    while silent and time.monotonic() < deadline:
        log.info("waiting for the cluster to declare %d unanswering node(s) dead", len(silent))
        time.sleep(2)
        silent &= {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    if silent:
        log.warning("%d node(s) listed alive did not answer; the next attempt does not count them", len(silent))
    return answered
