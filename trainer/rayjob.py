"""`psft rayjob --config stage.json`: the train stage of a multi-node job, as a KubeRay RayJob.

The Argo step of a multi-node train stage runs this supervisor in a small pod (no GPU).
It makes the stage's ConfigMap and RayJob exist, owned by the Workflow, and waits for the
RayJob to end:
- none yet: create it;
- one of this Workflow still running (the step was retried after its pod was lost): adopt
  it, so a retry never starts a second Ray cluster;
- one that ended, or one left by an earlier Workflow of the job (a restart on a spec
  change): delete it and create a new one, so a retried step, `argo retry` and a restart
  all run the training again (it resumes from its last checkpoint);
- one not labelled as this job's: refuse (psft deletes only what it created).
While it waits, it mirrors the driver's step into Argo's progress file (scraping the
driver's /metrics on the Ray head), and when the RayJob ends it leaves train/summary.json
where the step's `metrics` output parameter reads it, so a multi-node job's status shows
step, entropy and loss like a one-node job's. Exit 0 when the Ray job succeeded; otherwise
a one-line error with KubeRay's reason and message.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from psft.trainer.telemetry import report_progress
from psft.workflows import argo, argo_ray, layout
from psft.workflows.argo_ray import WORKFLOW_NAME_ENV, WORKFLOW_UID_ENV
from psft.workflows.errors import UserError
from psft.workflows.pipeline import Stage, build_pipeline
from psft.workflows.stages import StageConfig

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Outcome = Literal["running", "succeeded", "failed"]
Plan = Literal["create", "adopt", "replace", "wait", "refuse"]

POLL_SECONDS = 10.0
SUPERVISOR_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "create", "delete"]},
    # the head pod's IP, to scrape the driver's /metrics
    {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"]},
    # the owner reference to the Workflow sets blockOwnerDeletion: admission
    # (OwnerReferencesPermissionEnforcement) asks for update on the owner's finalizers
    {"apiGroups": ["argoproj.io"], "resources": ["workflows/finalizers"], "verbs": ["update"]},
]
"""What RayJobApi calls as the stage pods' ServiceAccount: the chart's workflow Role grants
exactly this with workflows.rayJobs (tests/chart asserts it; the real-cluster test runs the
supervisor as that ServiceAccount)."""


class RayJobFailed(UserError):
    """The RayJob ended without success (the message says how, in KubeRay's words)."""


def outcome(status: Mapping[str, Any] | None) -> Outcome:
    """Where a RayJob stands, from its status (KubeRay 1.4-1.7):
    - success: jobDeploymentStatus `Complete` with jobStatus `SUCCEEDED` (the submitter is
      done, the Ray job succeeded);
    - failure: jobDeploymentStatus `Failed` (retries of spec.backoffLimit used up, the
      deadline passed, or submission failed; between retries KubeRay reports `Retrying`
      while jobStatus still reads FAILED, so jobStatus FAILED alone is not the end),
      `ValidationFailed` (KubeRay >= 1.5 refused the RayJob), or jobStatus `STOPPED` (the
      Ray job was stopped; KubeRay never retries it; deployment status then `Complete`);
    - anything else: still running."""
    status = status or {}
    deployment, job = status.get("jobDeploymentStatus"), status.get("jobStatus")
    if deployment in ("Failed", "ValidationFailed") or job == "STOPPED":
        return "failed"
    if deployment == "Complete" and job == "SUCCEEDED":
        return "succeeded"
    if deployment == "Complete":
        return "failed"  # complete without success (a future end state): not a success
    return "running"


def failure_message(rayjob: Obj) -> str:
    status = rayjob.get("status") or {}
    parts = [
        f"jobDeploymentStatus {status.get('jobDeploymentStatus') or '-'}",
        f"jobStatus {status.get('jobStatus') or '-'}",
    ]
    if status.get("reason"):
        parts.append(f"reason {status['reason']}")
    name = rayjob["metadata"]["name"]
    message = status.get("message") or "no message from KubeRay"
    return f"RayJob {name} ended without success ({', '.join(parts)}): {message}"


def owned_by(obj: Obj, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def plan(existing: Obj | None, job_name: str, workflow_uid: str) -> Plan:
    """What to do about the RayJob found under our name (see the module docstring)."""
    if existing is None:
        return "create"
    meta = existing["metadata"]
    if (meta.get("labels") or {}).get(argo.JOB_LABEL) != job_name:
        return "refuse"
    if meta.get("deletionTimestamp"):
        return "wait"
    if owned_by(existing, workflow_uid) and outcome(existing.get("status")) == "running":
        return "adopt"
    return "replace"


def owner_reference(workflow_name: str, workflow_uid: str) -> Obj:
    return {
        "apiVersion": argo.ARGO_API_VERSION,
        "kind": "Workflow",
        "name": workflow_name,
        "uid": workflow_uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned(manifest: Obj, owner: Obj) -> Obj:
    return {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [owner]}}


def progress_from_metrics(text: str) -> dict[str, int] | None:
    """{"step", "total_steps"} from the driver's Prometheus exposition, if it has both."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, int] = {}
    wanted = {"psft_train_step": "step", "psft_train_total_steps": "total_steps"}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    found[wanted[sample.name]] = int(sample.value)
    except ValueError:
        return None
    return found if len(found) == 2 else None


@dataclass
class RayJobApi:
    """The few calls the supervisor makes, as the stage pod's ServiceAccount."""

    namespace: str
    client: Any = None

    def __post_init__(self) -> None:
        import kubernetes

        if self.client is None:
            configuration = kubernetes.client.Configuration()
            try:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(client_configuration=configuration)
            self.client = kubernetes.client.ApiClient(configuration)
        self.objects = kubernetes.client.CustomObjectsApi(self.client)
        self.core = kubernetes.client.CoreV1Api(self.client)

    def _missing(self, exc: Exception) -> bool:
        return getattr(exc, "status", None) == 404

    def get_rayjob(self, name: str) -> Obj | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.objects.get_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayjobs", name
            )
        except ApiException as exc:
            if self._missing(exc):
                return None
            raise

    def create_rayjob(self, manifest: Obj) -> Obj:
        return self.objects.create_namespaced_custom_object(
            "ray.io", "v1", self.namespace, "rayjobs", manifest
        )

    def delete_rayjob(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.objects.delete_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayjobs", name, propagation_policy="Background"
            )
        except ApiException as exc:
            if not self._missing(exc):
                raise

    def head_pod_ip(self, cluster: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self.objects.get_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayclusters", cluster
            )
        except ApiException as exc:
            if self._missing(exc):
                return None
            raise
        return ((obj.get("status") or {}).get("head") or {}).get("podIP")

    def put_config_map(self, manifest: Obj) -> None:
        """Create the ConfigMap, or replace the data of ours (an earlier attempt's)."""
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        try:
            self.core.create_namespaced_config_map(self.namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_namespaced_config_map(name, self.namespace, manifest)


def _train_stage(config: StageConfig) -> Stage:
    return next(s for s in build_pipeline(config.job) if s.name == config.stage)


def ensure_rayjob(
    api: RayJobApi,
    config: StageConfig,
    workflow: tuple[str, str],
    sleep: Callable[[float], None] = time.sleep,
    timeout: float = 300,
) -> Obj:
    """Make the stage's RayJob exist for this Workflow (create, adopt or replace)."""
    job, stage = config.job, _train_stage(config)
    owner = owner_reference(*workflow)
    name = argo_ray.rayjob_name(job, stage)
    deadline = time.monotonic() + timeout
    while True:
        existing = api.get_rayjob(name)
        step = plan(existing, job.metadata.name, workflow[1])
        if step == "refuse":
            raise UserError(
                f"RayJob {name} exists in namespace {api.namespace} and is not one of PSFTJob "
                f"{job.metadata.name}'s (label {argo.JOB_LABEL}); psft does not delete it. "
                "Delete or rename it, then retry the job"
            )
        if step == "adopt":
            assert existing is not None
            print(f"adopting RayJob {name} (still running)", flush=True)
            return existing
        if step == "create":
            api.put_config_map(owned(argo_ray.config_map(job, stage), owner))
            created = api.create_rayjob(owned(argo_ray.rayjob(job, stage), owner))
            print(f"created RayJob {name}", flush=True)
            return created
        if step == "replace":
            assert existing is not None
            ended = outcome(existing.get("status"))
            print(f"deleting RayJob {name} of an earlier attempt ({ended})", flush=True)
            api.delete_rayjob(name)
        if time.monotonic() > deadline:
            raise UserError(f"RayJob {name} of an earlier attempt is still being deleted")
        sleep(2.0)


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def watch_rayjob(
    api: RayJobApi,
    name: str,
    metrics_port: int | None,
    sleep: Callable[[float], None] = time.sleep,
    scrape: Callable[[str], str | None] = _scrape,
) -> Obj:
    """Poll the RayJob until it ends; mirror the driver's step into Argo's progress file."""
    last_step = None
    while True:
        rayjob = api.get_rayjob(name)
        if rayjob is None:
            raise RayJobFailed(f"RayJob {name} was deleted before it ended")
        status = rayjob.get("status") or {}
        if outcome(status) != "running":
            return rayjob
        cluster = status.get("rayClusterName")
        if metrics_port and cluster and (ip := api.head_pod_ip(cluster)):
            text = scrape(f"http://{ip}:{metrics_port}/metrics")
            progress = progress_from_metrics(text) if text else None
            if progress and progress["step"] != last_step:
                last_step = progress["step"]
                report_progress(progress)
                print(f"step {progress['step']}/{progress['total_steps']}", flush=True)
        sleep(POLL_SECONDS)


def publish_summary(config: StageConfig) -> None:
    """Bring train/summary.json from the run's storage to where the step's output reads it."""
    from psft.trainer.storage import open_run_store
    from psft.trainer.storage.base import MissingArtifact

    try:
        open_run_store(config).pull(layout.stage_summary(config.stage))
    except MissingArtifact as exc:
        log.warning("no training summary to report: %s", exc)


def workflow_identity() -> tuple[str, str]:
    name, uid = os.environ.get(WORKFLOW_NAME_ENV), os.environ.get(WORKFLOW_UID_ENV)
    if not name or not uid:
        raise UserError(
            f"${WORKFLOW_NAME_ENV} and ${WORKFLOW_UID_ENV} are unset: `psft rayjob` runs as "
            "the train step of a multi-node job's Argo Workflow, which sets them"
        )
    return name, uid


def run(config: StageConfig, api: RayJobApi | None = None) -> None:
    if config.kind != "train":
        raise UserError(f"psft rayjob runs a train stage, not {config.kind!r}")
    job = config.job
    api = api or RayJobApi(job.metadata.namespace)
    rayjob = ensure_rayjob(api, config, workflow_identity())
    port = job.spec.monitoring.metrics_port if job.spec.monitoring.enabled else None
    ended = watch_rayjob(api, rayjob["metadata"]["name"], port)
    publish_summary(config)
    if outcome(ended.get("status")) != "succeeded":
        raise RayJobFailed(failure_message(ended))
    print(f"RayJob {ended['metadata']['name']} succeeded", flush=True)
