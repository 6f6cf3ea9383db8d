"""Placing a multi-node run's workers on the Ray cluster: a deadline and a message.

verl asks Ray for one placement group per node (STRICT_PACK: `per_node` bundles of 1 CPU,
plus 1 GPU each on GPUs; ray_trainer.RayPSFTTrainer) and waits for them with no limit, so
a cluster that never offers that shape (fewer nodes joined than spec.resources.nodes,
fewer GPUs on a node than gpusPerNode) hung the stage in silence. The driver now asks for
the same groups first, reports every 30 s what the cluster has while it waits, hands the
placed groups to verl's resource pool (so nothing can take them in between), and stops with
a one-line error naming the fields when, after the deadline, the cluster still has too few
nodes able to hold a group. A cluster that could hold them but is busy is waited for, as a
scheduler queues a pod, with the report saying so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from psft.workflows.errors import UserError

TIMEOUT_ENV = "PSFT_RAY_PLACEMENT_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
"""Seconds to wait for nodes able to hold the groups (a RayJob's workers join after its
driver starts)."""
REPORT_EVERY = 30.0


@dataclass(frozen=True)
class Shape:
    """What the run asks of the Ray cluster: `nodes` groups of `per_node` workers."""

    nodes: int
    per_node: int
    gpu: bool

    @property
    def bundle(self) -> dict[str, float]:
        return {"CPU": 1.0, "GPU": 1.0} if self.gpu else {"CPU": 1.0}

    def groups_on(self, resources: dict[str, float]) -> int:
        """How many of the run's groups one node with these resources can hold."""
        return int(
            min(
                resources.get(name, 0.0) // (need * self.per_node)
                for name, need in self.bundle.items()
            )
        )

    @property
    def fields(self) -> str:
        return "spec.resources.nodes x gpusPerNode" if self.gpu else "spec.resources.nodes"

    def describe(self) -> str:
        unit = "1 CPU + 1 GPU" if self.gpu else "1 CPU"
        groups = f"{self.nodes} group{'s' if self.nodes != 1 else ''}"
        workers = f"{self.per_node} worker{'s' if self.per_node != 1 else ''}"
        return f"{groups} of {workers} ({unit} each, each group on one node)"


def alive_nodes(ray_nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in ray_nodes if n.get("Alive")]


def capacity(shape: Shape, ray_nodes: list[dict[str, Any]]) -> int:
    """Groups the cluster's live nodes could hold when idle."""
    return sum(shape.groups_on(n.get("Resources") or {}) for n in alive_nodes(ray_nodes))


def cluster_summary(ray_nodes: list[dict[str, Any]]) -> str:
    parts = []
    for node in alive_nodes(ray_nodes):
        res = node.get("Resources") or {}
        parts.append(
            f"{node.get('NodeManagerAddress', '?')}: "
            f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
        )
    return "; ".join(parts) or "no live node"


def too_small(shape: Shape, ray_nodes: list[dict[str, Any]], waited: float, address: str) -> str:
    fits = capacity(shape, ray_nodes)
    more = "more replicas or nodes with more GPUs" if shape.gpu else "more replicas"
    return (
        f"{shape.fields}: the run needs {shape.describe()}, and after {waited:.0f} s the "
        f"Ray cluster at {address} can hold {fits} ({cluster_summary(ray_nodes)}). Give "
        f"the RayJob's worker group {more}, or lower {shape.fields.replace(' x ', ' / ')}; "
        f"{TIMEOUT_ENV} sets how long to wait for nodes to join"
    )


def waiting_line(shape: Shape, ray_nodes: list[dict[str, Any]], waited: float) -> str:
    fits = capacity(shape, ray_nodes)
    why = (
        "the cluster could hold them; its resources are in use"
        if fits >= shape.nodes
        else f"{fits} can fit on the nodes that joined so far"
    )
    return (
        f"waiting {waited:.0f} s for the Ray cluster to place {shape.describe()}: {why} "
        f"({cluster_summary(ray_nodes)})"
    )


def placement_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise UserError(
            f"{TIMEOUT_ENV}={raw!r}: not a number of seconds; set it to one (for example "
            f"{DEFAULT_TIMEOUT:g}) or unset it"
        )
    return value


def place(
    shape: Shape,
    timeout: float | None = None,
    report: Callable[[str], None] = print,
) -> tuple[list[Any], float]:
    """Ray's placement groups for the run, once all are placed, and the seconds it took;
    UserError when the cluster still cannot hold them after `timeout`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if timeout is None:
        timeout = placement_timeout()
    started = time.monotonic()
    groups: list[Any] = []
    try:
        for _ in range(shape.nodes):
            bundles = [dict(shape.bundle) for _ in range(shape.per_node)]
            groups.append(placement_group(bundles, strategy="STRICT_PACK"))
        pending = [g.ready() for g in groups]
        while True:
            left = started + timeout - time.monotonic()
            step = REPORT_EVERY if left <= 0 else min(REPORT_EVERY, left)
            reaches_deadline = left <= REPORT_EVERY  # (ray.wait may return a hair early)
            _ready, pending = ray.wait(pending, num_returns=len(pending), timeout=step)
            if not pending:
                return groups, time.monotonic() - started
            waited = time.monotonic() - started
            nodes = ray.nodes()
            if reaches_deadline and capacity(shape, nodes) < shape.nodes:
                address = ray.get_runtime_context().gcs_address
                raise UserError(too_small(shape, nodes, waited, address))
            report(waiting_line(shape, nodes, waited))
    except BaseException:
        for group in groups:
            with suppress(Exception):
                remove_placement_group(group)
        raise
