"""kopf handlers: each a thin entry point into psft.operator.reconcile.

Registered in `REGISTRY` (not kopf's global one) so that importing this module has no side
effects on other kopf operators in the same process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import kopf

from psft.operator import cleanup, kube, metrics, reconcile

REGISTRY = kopf.OperatorRegistry()
JOBS = (kube.JOB_GROUP, kube.JOB_VERSION, kube.JOB_PLURAL)
WORKFLOWS = (kube.WF_GROUP, kube.WF_VERSION, kube.WF_PLURAL)


def configure(settings: kopf.OperatorSettings) -> kopf.OperatorSettings:
    """Operator settings: our own annotation prefix, no event per handler, bounded retries."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="psft.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="psft.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "psft.dev/artifacts"
    settings.posting.level = logging.WARNING  # our handlers post the meaningful Events
    # a crashed replica's peering record expires after this; the standby (or the restarted
    # operator) then takes over: 20 s, not kopf's 60 (keep-alives every 10-15 s)
    settings.peering.lifetime = 20
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    # settings.queueing.worker_limit stays unbounded (kopf's default): with a cap, jobs
    # beyond it wait for other objects' workers to idle out (5 s each) - measured under load
    settings.execution.max_workers = kube.CONCURRENCY  # threads running the (blocking) handlers
    return settings


class _Outcome:
    result = "error"


@contextlib.contextmanager
def _measured() -> Iterator[_Outcome]:
    """Count and time one reconcile; `retry` when kopf will try again, else the result set."""
    started = time.perf_counter()
    outcome = _Outcome()
    try:
        yield outcome
    except kopf.TemporaryError:
        outcome.result = "retry"
        raise
    finally:
        metrics.RECONCILES.labels(outcome.result).inc()
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, then $KUBECONFIG (kopf's own client)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=REGISTRY)
def connect(**_: Any) -> None:
    reconcile.reset()
    kube.connect()


@kopf.on.cleanup(registry=REGISTRY)
def disconnect(**_: Any) -> None:
    kube.disconnect()


@kopf.on.resume(*JOBS, registry=REGISTRY)
@kopf.on.create(*JOBS, registry=REGISTRY)
@kopf.on.update(*JOBS, registry=REGISTRY)
def reconcile_job(
    body: kopf.Body, reason: str | None, diff: kopf.Diff, logger: logging.Logger, **_: Any
) -> None:
    """Validate, create/adopt/restart the Workflow, suspend/resume it, update status."""
    with _measured() as outcome:
        changed = any(
            path[:1] == ("spec",) and path[:2] != ("spec", "suspend") for _, path, _, _ in diff
        )
        outcome.result = reconcile.reconcile_job(_plain(body), logger, reason, spec_changed=changed)


def _owned_workflow(body: kopf.Body, **_: Any) -> bool:
    return reconcile.owner_of(_workflow_view(body)) is not None


@kopf.on.event(*WORKFLOWS, when=_owned_workflow, registry=REGISTRY)
def workflow_changed(body: kopf.Body, type: str | None, logger: logging.Logger, **_: Any) -> None:
    """Mirror an owned Workflow's progress into its PSFTJob's status. kopf never retries an
    event handler: a sync that fails temporarily is retried here (reconcile.resync_later),
    or the Workflow's last change (Failed, Succeeded) would never reach the status."""
    owner = reconcile.owner_of(_workflow_view(body))
    if owner is None:
        return
    namespace = body["metadata"]["namespace"]
    with _measured() as outcome:
        workflow = _workflow_view(body) if type != "DELETED" else None
        if workflow is not None and reconcile.already_synced(namespace, owner[0], workflow):
            outcome.result = "ok"
            return  # the status already reflects this very version of the Workflow
        try:
            reconcile.sync_status(namespace, owner[0], workflow_seen=workflow)
        except kopf.TemporaryError as exc:
            logger.warning(f"{exc}; syncing the status of {namespace}/{owner[0]} again soon")
            reconcile.resync_later(namespace, owner[0], logger)
            outcome.result = "retry"
            return
        outcome.result = "ok"


def _deletes_artifacts(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("storage") or {}).get("deleteOnJobDeletion"))


@kopf.on.delete(*JOBS, when=_deletes_artifacts, registry=REGISTRY)
def delete_artifacts(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """storage.deleteOnJobDeletion: remove the run's artifacts (the finalizer waits for it)."""
    job, errors = reconcile.validate(_plain(body))
    if job is None:
        logger.warning(f"not deleting artifacts of an invalid job: {'; '.join(errors)}")
        return
    cleanup.delete_artifacts(job, logger)


def _deleted(type: str | None, **_: Any) -> bool:
    return type == "DELETED"


@kopf.on.event(*JOBS, when=_deleted, registry=REGISTRY)
def forget_job(meta: kopf.Meta, **_: Any) -> None:
    """A job is gone: drop it from the metrics (its Workflow goes by cascade deletion)."""
    metrics.TRACKER.forget(meta["namespace"], meta["name"])
    reconcile.forget(meta["namespace"], meta["name"])


def _plain(body: kopf.Body) -> dict[str, Any]:
    """The raw object as a dict (kopf's Body is a view). Shallow: callers only read it."""
    return dict(body)


def _workflow_view(body: kopf.Body) -> dict[str, Any]:
    """What status mirroring reads of a Workflow; its templates (large) are left out."""
    return {
        "metadata": body.get("metadata") or {},
        "spec": {"suspend": (body.get("spec") or {}).get("suspend")},
        "status": body.get("status") or {},
    }
