"""Level-triggered reconciliation of one PSFTJob: its Workflow, then its status.

`reconcile_job` makes the world match the spec (validate, create or adopt the Workflow,
restart or refuse on spec changes, suspend/resume). `sync_status` recomputes the status from
fresh reads of the job and its Workflow and writes it only when it changed. Both are safe to
call any number of times, from any handler, after an operator restart.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from psft.operator import kube
from psft.operator.metrics import TRACKER
from psft.operator.status import Observation, desired_status, status_changed, status_patch
from psft.workflows import argo
from psft.workflows.pipeline import build_pipeline
from psft.workflows.spec import API_VERSION, KIND, PSFTJob
from psft.workflows.validate import InvalidJob, validate_job

Obj = dict[str, Any]

SPEC_HASH = argo.SPEC_HASH_ANNOTATION
_DONE = {"Succeeded", "Failed"}  # terminal PSFTJob phases
_FINISHED = {"Succeeded", "Failed", "Error"}
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()
_synced: dict[tuple[str, str], str | None] = {}  # job -> Workflow resourceVersion of its status


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks[(namespace, name)]


def reset() -> None:
    """Forget what an earlier operator run in this process saw (startup)."""
    with _locks_guard:
        _synced.clear()
        _service_accounts_seen.clear()


def forget(namespace: str, name: str) -> None:
    with _locks_guard:
        _locks.pop((namespace, name), None)
        _synced.pop((namespace, name), None)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def spec_hash(job: PSFTJob) -> str:
    """Fingerprint of the spec the Workflow runs, with defaults filled in; `suspend` is left
    out because it is a toggle applied to the running Workflow, not a change of the job."""
    unsuspended = job.spec.model_copy(update={"suspend": False})
    return argo.spec_hash(job.model_copy(update={"spec": unsuspended}))


def validate(body: Obj) -> tuple[PSFTJob | None, list[str]]:
    """The job as the schema sees it, or the list of field errors."""
    meta = body.get("metadata") or {}
    data = {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind", KIND),
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "labels", "annotations", "uid") if k in meta
        },
        "spec": body.get("spec"),
    }
    try:
        job = validate_job(data, source=f"{meta.get('namespace')}/{meta.get('name')}")
    except InvalidJob as exc:
        return None, [str(e) for e in exc.errors]
    errors = argo.cluster_errors(job)  # valid locally, but not runnable on a cluster
    return (None, [str(e) for e in errors]) if errors else (job, [])


def render(job: PSFTJob, body: Obj) -> Obj:
    """The Workflow the job should own: rendered by psft.workflows.argo, owned, fingerprinted."""
    workflow = argo.render_workflow(job)
    kopf.adopt(workflow, owner=body)
    workflow["metadata"].setdefault("annotations", {})[SPEC_HASH] = spec_hash(job)
    return workflow


def owner_of(workflow: Obj) -> tuple[str, str] | None:
    """(name, uid) of the PSFTJob owning a Workflow, if any."""
    for ref in workflow.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith("psft.dev/"):
            return ref.get("name"), ref.get("uid")
    return None


def running_hash(workflow: Obj | None) -> str | None:
    return ((workflow or {}).get("metadata", {}).get("annotations") or {}).get(SPEC_HASH)


def refused_change(job: PSFTJob | None, workflow: Obj | None) -> str | None:
    """Why the current spec is not applied (spec changed after start, restartPolicy Never)."""
    if job is None or workflow is None or running_hash(workflow) in (None, spec_hash(job)):
        return None
    if job.spec.restart_policy == "OnSpecChange":
        return None
    return (
        "spec changed after the Workflow started; the change is not applied. Revert it, or set "
        "spec.restartPolicy: OnSpecChange to restart the job with the new spec"
    )


def reconcile_job(
    body: Obj, logger: Any, reason: str | None = None, spec_changed: bool = False
) -> str:
    """Bring the job's Workflow in line with its spec; returns ok | invalid.

    `reason` is kopf's cause (create, update, resume): a job seen for the first time goes
    straight to creating its Workflow (409 -> adopt); otherwise the Workflow is read first.
    A finished job whose Workflow is gone (ttlSecondsAfterFinished) is not run again, unless
    its spec changed (`spec_changed`) and restartPolicy is OnSpecChange.
    """
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    job, _errors = validate(body)
    if job is None:
        sync_status(namespace, name, job_seen=body)
        return "invalid"

    desired = render(job, body)
    wf_name = desired["metadata"]["name"]
    workflow = None
    if reason != "create":
        with kube.retry_on_api_error(f"reading Workflow {wf_name}"):
            workflow = kube.get_workflow(namespace, wf_name)
    if workflow is not None and (owner_of(workflow) or (None, None))[1] != meta["uid"]:
        message = f"Workflow {wf_name} exists and is not owned by this PSFTJob; waiting"
        sync_status(namespace, name, create_error=message)
        raise kopf.TemporaryError(message, delay=10)

    if workflow is not None and running_hash(workflow) != spec_hash(job):
        if job.spec.restart_policy == "OnSpecChange":
            logger.info(f"spec changed: restarting Workflow {wf_name}")
            kopf.event(
                body,
                type="Normal",
                reason="Restarting",
                message="spec changed: recreating the Workflow",
            )
            with kube.retry_on_api_error(f"deleting Workflow {wf_name}"):
                kube.delete_workflow(namespace, wf_name)
            workflow = None
        else:
            sync_status(namespace, name)
            return "ok"

    finished_before = (body.get("status") or {}).get("phase") in _DONE
    if workflow is None and finished_before and reason != "create":
        if not (spec_changed and job.spec.restart_policy == "OnSpecChange"):
            sync_status(namespace, name, job_seen=body)
            return "ok"
        message = "spec changed after the job finished: running it again (OnSpecChange)"
        kopf.event(body, type="Normal", reason="Restarting", message=message)

    if workflow is None:
        _require_service_account(body, job)
        workflow = _create_or_adopt(body, desired, logger)

    want_suspend = bool(job.spec.suspend)
    spec = workflow.get("spec") or {}
    finished = (workflow.get("status") or {}).get("phase") in _FINISHED
    if bool(spec.get("suspend")) != want_suspend and not finished:
        with kube.retry_on_api_error(f"suspending/resuming Workflow {wf_name}"):
            workflow = kube.patch_workflow(
                namespace, wf_name, {"spec": {"suspend": True if want_suspend else None}}
            )
        kopf.event(
            body,
            type="Normal",
            reason="Suspended" if want_suspend else "Resumed",
            message=f"Workflow {wf_name} {'suspended' if want_suspend else 'resumed'}",
        )
    sync_status(namespace, name, job_seen=body, workflow_seen=workflow)
    return "ok"


SERVICE_ACCOUNT_RECHECK_S = 10
"""How often a job waiting for its stage pods' ServiceAccount looks for it again."""


def missing_service_account_message(namespace: str, name: str) -> str:
    return (
        f"ServiceAccount {name} not found in namespace {namespace}: the stage pods run as it. "
        f"Install the chart with --set 'workflows.namespaces={{{namespace}}}' (it creates "
        f"{argo.DEFAULT_SERVICE_ACCOUNT} and its Role there), or set "
        "spec.resources.serviceAccountName to an existing ServiceAccount; the job starts once "
        "it exists"
    )


SERVICE_ACCOUNT_SEEN_S = 60.0
"""How long a ServiceAccount found to exist is trusted without reading it again (a burst
of jobs in one namespace then costs one read, not one per job)."""
_service_accounts_seen: dict[tuple[str, str], float] = {}


def _require_service_account(body: Obj, job: PSFTJob) -> None:
    """Wait (status, Event, retry) until the stage pods' ServiceAccount exists: a Workflow
    created without it only fails pod after pod with "serviceaccount ... not found"."""
    namespace = body["metadata"]["namespace"]
    name = job.spec.resources.service_account_name or argo.DEFAULT_SERVICE_ACCOUNT
    key, now_s = (namespace, name), time.monotonic()
    with _locks_guard:
        if (
            now_s - _service_accounts_seen.get(key, -SERVICE_ACCOUNT_SEEN_S)
            < SERVICE_ACCOUNT_SEEN_S
        ):
            return
    with kube.retry_on_api_error(f"reading ServiceAccount {name}"):
        exists = kube.service_account_exists(namespace, name)
    if exists:
        with _locks_guard:
            _service_accounts_seen[key] = now_s
        return
    message = missing_service_account_message(namespace, name)
    before = (body.get("status") or {}).get("message")
    status = sync_status(
        namespace,
        body["metadata"]["name"],
        create_error=message,
        create_reason="ServiceAccountMissing",
        job_seen=body,
    )
    if status is not None and status.get("message") != before:
        kopf.warn(body, reason="ServiceAccountMissing", message=message)
    raise kopf.TemporaryError(message, delay=SERVICE_ACCOUNT_RECHECK_S)


def _create_or_adopt(body: Obj, desired: Obj, logger: Any) -> Obj:
    namespace = body["metadata"]["namespace"]
    wf_name = desired["metadata"]["name"]
    try:
        created = kube.create_workflow(namespace, desired)
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        # no answer (connection lost, timeout): the Workflow may exist; the retry adopts it
        raise kopf.TemporaryError(
            f"creating Workflow {wf_name}: no answer ({exc}); retrying", delay=2
        ) from None
    except ApiException as exc:
        if exc.status == 409:
            with kube.retry_on_api_error(f"reading Workflow {wf_name}"):
                existing = kube.get_workflow(namespace, wf_name)
            owner = owner_of(existing or {})
            if existing is not None and existing["metadata"].get("deletionTimestamp"):
                raise kopf.TemporaryError(
                    f"waiting for the previous Workflow {wf_name} to be deleted", delay=2
                ) from None
            if existing is None or owner is None or owner[1] != body["metadata"]["uid"]:
                raise kopf.TemporaryError(
                    f"Workflow {wf_name} exists but is not ours (yet): retrying", delay=5
                ) from None
            logger.info(f"adopted the existing Workflow {wf_name}")
            return existing
        if exc.status in (400, 403, 404, 422):
            message = f"HTTP {exc.status}: {kube.api_message(exc)}"
            sync_status(namespace, body["metadata"]["name"], create_error=message)
            kopf.warn(body, reason="WorkflowCreateFailed", message=message)
            raise kopf.PermanentError(f"cannot create Workflow {wf_name}: {message}") from None
        with kube.retry_on_api_error(f"creating Workflow {wf_name}"):
            raise
    logger.info(f"created Workflow {wf_name}")
    kopf.event(body, type="Normal", reason="WorkflowCreated", message=f"created Workflow {wf_name}")
    return created


def already_synced(namespace: str, name: str, workflow: Obj) -> bool:
    """Whether the job's status was last computed from exactly this Workflow version."""
    with _locks_guard:
        return _synced.get((namespace, name)) == workflow["metadata"].get("resourceVersion")


def sync_status(
    namespace: str,
    name: str,
    create_error: str | None = None,
    create_reason: str = "CreateFailed",
    workflow_seen: Obj | None = None,
    job_seen: Obj | None = None,
) -> Obj | None:
    """Recompute the job's status and write it only if it changed.

    `workflow_seen` / `job_seen`: objects the caller has just received (a watch event, a
    create response); they save reads on the first attempt. A seen job is only trusted for
    a write guarded by its resourceVersion: "nothing changed" is confirmed on a fresh read.
    """
    with _lock(namespace, name):
        for _attempt in range(5):
            if job_seen is not None:
                body, trusted = job_seen, False
                job_seen = None
            else:
                with kube.retry_on_api_error(f"reading PSFTJob {namespace}/{name}"):
                    body, trusted = kube.get_job(namespace, name), True
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            job, errors = validate(body)
            workflow = None
            wf_name = None
            if job is not None:
                wf_name = argo.workflow_name(job)
                if workflow_seen is not None and workflow_seen["metadata"]["name"] == wf_name:
                    workflow, workflow_seen = workflow_seen, None
                else:
                    with kube.retry_on_api_error(f"reading Workflow {wf_name}"):
                        workflow = kube.get_workflow(namespace, wf_name)
                owner = owner_of(workflow or {})
                if workflow is not None and (owner is None or owner[1] != body["metadata"]["uid"]):
                    workflow = None  # someone else's (or a namesake's, being deleted)
            seen = Observation(
                errors=tuple(errors),
                workflow_name=wf_name,
                create_error=create_error,
                create_reason=create_reason,
                refused_change=refused_change(job, workflow),
            )
            stages = build_pipeline(job) if job is not None else []
            current = body.get("status") or {}
            desired = desired_status(body, job, stages, workflow, seen, now())
            if not status_changed(current, desired):
                if not trusted:
                    continue  # the seen copy may be stale: confirm on a fresh read
                _remember(namespace, name, workflow)
                TRACKER.observe(namespace, name, body["metadata"]["uid"], desired)
                return desired
            patch = status_patch(current, desired)
            try:
                kube.patch_job_status(namespace, name, patch, body["metadata"]["resourceVersion"])
            except ApiException as exc:
                if exc.status == 409:
                    continue  # changed since we read it: recompute from the fresh object
                if exc.status == 404:
                    return None
                with kube.retry_on_api_error(f"writing status of {namespace}/{name}"):
                    raise
            _remember(namespace, name, workflow)
            TRACKER.observe(namespace, name, body["metadata"]["uid"], desired)
            _post_transition_events(body, current, desired)
            return desired
        raise kopf.TemporaryError(f"status of {namespace}/{name} kept changing; retrying", delay=1)


RESYNC_DELAYS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
"""Waits between retries of a status sync that failed where kopf does not retry (an event
handler: the Workflow's progress); after the last, the next event or reconcile syncs."""
_resyncs: set[tuple[str, str]] = set()


def resync_later(namespace: str, name: str, logger: Any, attempt: int = 0) -> None:
    """Recompute the job's status again soon, in a timer thread, with backoff: for a sync
    that failed temporarily in a handler kopf does not retry. One pending retry per job."""
    key = (namespace, name)
    with _locks_guard:
        if key in _resyncs:
            return
        _resyncs.add(key)

    def run() -> None:
        with _locks_guard:
            _resyncs.discard(key)
        try:
            sync_status(namespace, name)
        except kopf.TemporaryError as exc:
            if attempt + 1 < len(RESYNC_DELAYS):
                resync_later(namespace, name, logger, attempt + 1)
            else:
                logger.error(f"status of {namespace}/{name} not synced: {exc}")
        except Exception as exc:  # a timer thread has no one to report to but the log
            logger.error(f"status of {namespace}/{name} not synced: {exc!r}")

    timer = threading.Timer(RESYNC_DELAYS[attempt], run)
    timer.daemon = True
    timer.start()


def _remember(namespace: str, name: str, workflow: Obj | None) -> None:
    with _locks_guard:
        _synced[(namespace, name)] = (workflow or {}).get("metadata", {}).get("resourceVersion")


def _post_transition_events(body: Obj, before: Obj, after: Obj) -> None:
    old, new = before.get("phase"), after.get("phase")
    old_valid = _condition(before, "Valid")
    new_valid = _condition(after, "Valid")
    newly_false = (old_valid or {}).get("message") != (new_valid or {}).get("message") or old != new
    if new_valid and new_valid.get("status") == "False" and newly_false:
        kopf.warn(body, reason=new_valid["reason"], message=new_valid["message"])
    if old == new or new in (None, "Invalid"):
        return
    if new == "Failed":
        kopf.warn(body, reason="Failed", message=after.get("message", "the job failed"))
    elif new in ("Running", "Succeeded", "Suspended"):
        kopf.event(body, type="Normal", reason=new, message=after.get("message", new.lower()))


def _condition(status: Obj, ctype: str) -> Obj | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)
