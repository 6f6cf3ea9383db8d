"""Multi-node training: Workflow steps that run the train stage as a KubeRay RayJob.

Two resource steps replace the train pod when `resources.nodes > 1`:
1. `train-config` applies a ConfigMap holding the stage.json (owned by the Workflow);
2. `train` creates a RayJob (ray.io/v1): a Ray cluster of `nodes` pods with
   `gpusPerNode` GPUs each, whose entrypoint is `psft train --config /psft/stage.json`
   (fixed words only; the config file comes from the ConfigMap), and waits until the
   RayJob ends (RAYJOB_SUCCESS, RAYJOB_FAILURE). KubeRay retries the job `backoffLimit`
   times; spec.activeDeadlineSeconds bounds the step and the RayJob.
Validation refuses `resources.nodes > 1` until the multi-node launcher is written, so
only a job parsed without validate_job's rules renders these steps (the tests do).
Gang scheduling: the RayJob carries the queue label of Kueue, or Volcano's scheduler and
queue labels that KubeRay turns into a PodGroup, when the spec names them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hera.workflows import models as m

from psft.workflows import argo
from psft.workflows.pipeline import Stage
from psft.workflows.spec import PSFTJob

RAY_API_VERSION = "ray.io/v1"
RAY_CONFIG_TASK = "train-config"
ENTRYPOINT = f"psft train --config {argo.CONFIG_PATH}"
RAYJOB_SUCCESS = "status.jobDeploymentStatus == Complete, status.jobStatus == SUCCEEDED"
"""The Ray job succeeded and KubeRay is done with it (the submitter finished)."""
RAYJOB_FAILURE = (
    "status.jobDeploymentStatus in (Failed, ValidationFailed), status.jobStatus == STOPPED"
)
"""Every other end of a RayJob. Argo parses both conditions as label selectors, but
evaluates them differently (argo-workflows workflow/executor/resource.go,
matchConditions): the step succeeds when ALL success requirements match and fails as
soon as ANY failure requirement does, and failure is checked first. KubeRay's ends:
- jobDeploymentStatus `Failed`: retries (spec.backoffLimit) used up, the deadline passed,
  or submission failed. KubeRay writes `Failed` only once no retry is left; between
  retries it is `Retrying`, while jobStatus still reads FAILED, which is why jobStatus
  FAILED alone is not a failure here;
- jobDeploymentStatus `ValidationFailed` (KubeRay >= 1.5): the RayJob was refused;
- jobStatus `STOPPED` (jobDeploymentStatus then `Complete`): the Ray job was stopped;
  KubeRay never retries it."""
RAY_VERSION = "2.60.0"
"""Ray in the trainer image (images/trainer/Dockerfile, constraints.txt), as the RayJob's
rayVersion. KubeRay reads it to choose its probes: from 2.53 an HTTP GET of the dashboard
agent's /api/healthz; without it (or older) exec probes that run `wget`, which the trainer
image lacks, so every Ray pod would fail its probes. A custom image needs Ray >= 2.53 with
the dashboard agent (`ray[default]`)."""
RAY_METRICS_PORT_NAME = "psft-metrics"
RAYJOB_NAME_MAX = 47
"""KubeRay refuses longer RayJob names: it names the RayCluster `<rayjob>-<5 random>`
and caps RayCluster names at 53 (MaxRayJobNameLength in ray-operator/controllers/ray/
utils/constant.go, KubeRay 1.4-1.7)."""
RAYJOB_TTL_SECONDS = 0
"""Seconds KubeRay keeps the Ray cluster after the job ends (with shutdownAfterJobFinishes):
none, since the cluster holds every GPU of the job. The RayJob object, with its status
and message, stays until the Workflow that owns it is deleted."""


def rayjob_name(job: PSFTJob, stage: Stage) -> str:
    """`psft-<job>-<stage>` when that fits RAYJOB_NAME_MAX, else its start, 8 hex digits of
    the full name's SHA-256 and the stage: deterministic, distinct per job, and a DNS-1035
    label (it starts with `psft-` and ends with the stage name)."""
    name = f"{argo.workflow_name(job)}-{stage.name}"
    if len(name) <= RAYJOB_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = name[: RAYJOB_NAME_MAX - len(digest) - len(stage.name) - 2].rstrip("-")
    return f"{head}-{digest}-{stage.name}"


def config_map_name(job: PSFTJob, stage: Stage) -> str:
    return f"{rayjob_name(job, stage)}-config"


def config_map(job: PSFTJob, stage: Stage) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(job, stage),
            "labels": argo.job_labels(job, component="train"),
        },
        "data": {argo.CONFIG_FILE: argo.stage_config_data(job, stage)},
    }


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def pod_template(job: PSFTJob, stage: Stage, container_name: str) -> dict[str, Any]:
    """Pod template of a Ray node: the stage container plus the config volume."""
    r = job.spec.resources
    container = argo.stage_container(job, stage)
    container.name = container_name
    container.command = None  # KubeRay starts Ray in the container; the job is the entrypoint
    container.args = None
    for port in container.ports or []:
        # KubeRay points Ray's own metrics exporter at a port named `metrics`
        port.name = RAY_METRICS_PORT_NAME
    container.volume_mounts = [
        *(container.volume_mounts or []),
        m.VolumeMount(name="stage-config", mount_path=argo.CONFIG_DIR, read_only=True),
    ]
    config_volume = m.Volume(
        name="stage-config",
        config_map=m.ConfigMapVolumeSource(
            name=config_map_name(job, stage),
            items=[m.KeyToPath(key=argo.CONFIG_FILE, path=argo.CONFIG_FILE)],
        ),
    )
    queue_labels, queue_annotations = argo.queue_metadata(job)
    pod: dict[str, Any] = {
        "containers": [_dump(container)],
        "volumes": [_dump(v) for v in (*argo.volumes(job), config_volume)],
        "serviceAccountName": r.service_account_name or argo.DEFAULT_SERVICE_ACCOUNT,
        "securityContext": _dump(argo.pod_security()),
    }
    if r.node_selector:
        pod["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod["tolerations"] = [_dump(m.Toleration(**t.model_dump())) for t in r.tolerations]
    if r.priority_class_name:
        pod["priorityClassName"] = r.priority_class_name
    if r.scheduler_name:
        pod["schedulerName"] = r.scheduler_name
    metadata: dict[str, Any] = {
        "labels": {**argo.job_labels(job, component="stage"), **queue_labels}
        | {argo.STAGE_LABEL: stage.name}
    }
    if queue_annotations:
        metadata["annotations"] = queue_annotations
    return {"metadata": metadata, "spec": pod}


def rayjob(job: PSFTJob, stage: Stage) -> dict[str, Any]:
    r = job.spec.resources
    labels = argo.job_labels(job, component="train")
    if r.queue and r.scheduler_name == "volcano":
        labels |= {"ray.io/scheduler-name": "volcano", "volcano.sh/queue-name": r.queue}
    elif r.queue:
        labels[argo.KUEUE_QUEUE_LABEL] = r.queue
    workers = r.nodes - 1
    deadline = {}
    if job.spec.active_deadline_seconds is not None:
        # the Workflow's deadline stops only the step's pod: KubeRay itself must stop the
        # Ray cluster (it then reports Failed, reason DeadlineExceeded, and does not retry)
        deadline["activeDeadlineSeconds"] = job.spec.active_deadline_seconds
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": rayjob_name(job, stage), "labels": labels},
        "spec": {
            **deadline,
            "entrypoint": ENTRYPOINT,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": RAYJOB_TTL_SECONDS,
            "backoffLimit": job.spec.backoff_limit,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    "rayStartParams": {},
                    "template": pod_template(job, stage, "ray-head"),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu",
                        "replicas": workers,
                        "minReplicas": workers,
                        "maxReplicas": workers,
                        "rayStartParams": {},
                        "template": pod_template(job, stage, "ray-worker"),
                    }
                ],
            },
        },
    }


def _manifest(obj: dict[str, Any]) -> str:
    # JSON is YAML, and dumping it is two orders of magnitude faster than PyYAML
    return json.dumps(obj, indent=2) + "\n"


def ray_config_template(job: PSFTJob, stage: Stage) -> m.Template:
    return m.Template(
        name=RAY_CONFIG_TASK,
        resource=m.ResourceTemplate(
            action="apply",
            manifest=_manifest(config_map(job, stage)),
            set_owner_reference=True,
        ),
        active_deadline_seconds=argo.active_deadline(job),
    )


def ray_train_template(job: PSFTJob, stage: Stage) -> m.Template:
    return m.Template(
        name=stage.name,
        metadata=m.Metadata(labels={argo.STAGE_LABEL: stage.name}),
        resource=m.ResourceTemplate(
            action="create",
            manifest=_manifest(rayjob(job, stage)),
            set_owner_reference=True,
            success_condition=RAYJOB_SUCCESS,
            failure_condition=RAYJOB_FAILURE,
        ),
        active_deadline_seconds=argo.active_deadline(job),
    )
