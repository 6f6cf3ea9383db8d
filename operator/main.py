"""`psft operator`: run the kopf operator (namespaced or cluster-wide, with peering)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import kopf

from psft.operator import handlers, metrics
from psft.workflows.errors import UserError


def scope(namespaces: Sequence[str] | None, all_namespaces: bool) -> dict[str, Any]:
    """kopf's scope arguments: --namespace (repeatable) or --all-namespaces, not both."""
    if namespaces and all_namespaces:
        raise UserError("give either --namespace or --all-namespaces, not both")
    if namespaces:
        return {"namespaces": list(namespaces), "clusterwide": False}
    return {"namespaces": [], "clusterwide": True}


def peering(name: str | None, standalone: bool) -> dict[str, Any]:
    """Leader election through a kopf peering object, unless --standalone (one replica)."""
    if standalone:
        return {"standalone": True}
    return {"standalone": False, "peering_name": name or "psft-operator"}


async def operate(
    *,
    namespaces: Sequence[str] = (),
    clusterwide: bool = False,
    standalone: bool = True,
    peering_name: str | None = None,
    liveness_endpoint: str | None = None,
    priority: int | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    """The operator as a coroutine (what tests and benchmarks run in their own loop).

    With peering, replicas need distinct priorities: kopf pauses every operator that sees
    a live peer of the same priority. Each replica therefore draws a random one (unless
    given); the highest runs, the others stand by and take over when it leaves."""
    settings = handlers.configure(kopf.OperatorSettings())
    if priority is None:
        priority = secrets.randbelow(2**31 - 1) + 1
    await kopf.operator(
        registry=handlers.REGISTRY,
        settings=settings,
        namespaces=list(namespaces),
        clusterwide=clusterwide,
        standalone=standalone,
        peering_name=peering_name,
        priority=priority,
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def run_operator(args: argparse.Namespace) -> int:
    """Entry point of `psft operator` (see workflows/cli.py for the flags)."""
    level = os.environ.get("PSFT_LOG_LEVEL", "INFO").upper()  # DEBUG shows kopf's API calls
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    where = scope(args.namespace, args.all_namespaces)
    peers = peering(args.peering, args.standalone)
    metrics.serve(args.metrics_port, args.bind_address)
    liveness = (
        f"http://{args.bind_address}:{args.health_port}/healthz" if args.health_port else None
    )
    asyncio.run(operate(**where, **peers, liveness_endpoint=liveness))
    return 0


class OperatorThread:
    """The operator in a background thread with its own event loop (tests, benchmarks)."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="psft-operator", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(operate(**self._kwargs, stop_flag=self._stop, ready_flag=self._ready))
        except BaseException as exc:  # reported by stop()
            self._error = exc

    def start(self, timeout: float = 30) -> OperatorThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the operator did not become ready: {self._error!r}")
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the operator did not stop in time")
        if self._error is not None:
            raise self._error

    def __enter__(self) -> OperatorThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
