"""Multi-node training: the train stage as a KubeRay RayJob.

When `resources.nodes > 1` the train step's pod runs `psft rayjob` (psft.trainer.rayjob), a
small supervisor with no GPU, instead of the trainer. It creates the RayJob built here (a Ray
cluster of `nodes` pods with `gpusPerNode` GPUs each, whose entrypoint is
`psft train --config /psft/config/stage.json.b64`, fixed words only; the config file comes
from the ConfigMap built here) owned by the Workflow, adopts or replaces one left by an
earlier attempt, waits for it to end, and reports the driver's progress and summary like a
one-node train pod. KubeRay retries the Ray job `backoffLimit` times; Argo retries the
supervisor on infrastructure failures; spec.activeDeadlineSeconds bounds the step and the
RayJob. The entrypoint runs on the Ray head as the job's driver: it joins the cluster
(RAY_ADDRESS) and trains with verl's Ray trainer, one worker per GPU of every node
(psft.trainer.verl.ray_trainer, docs/multinode.md).
Gang scheduling: the RayJob carries the queue label of Kueue, or Volcano's scheduler and
queue labels that KubeRay turns into a PodGroup, when the spec names them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hera.workflows import models as m

from psft.workflows import argo
from psft.workflows.pipeline import Stage
from psft.workflows.spec import PSFTJob

RAY_API_VERSION = "ray.io/v1"
WORKFLOW_NAME_ENV = "PSFT_WORKFLOW_NAME"
WORKFLOW_UID_ENV = "PSFT_WORKFLOW_UID"
"""Environment of the supervisor: its Workflow's name and uid, which Argo substitutes for
{{workflow.name}} / {{workflow.uid}}, the owner of the RayJob and its ConfigMap (deleting
the Workflow, or its PSFTJob, removes them)."""
ENTRYPOINT = f"psft train --config {argo.CONFIG_PATH}"
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


def supervisor_template(job: PSFTJob, stage: Stage) -> m.Template:
    """The train step of a multi-node job: `psft rayjob` in a pod sized like prepare's,
    with no GPU and none of the spec's placement (the Ray pods get those)."""
    container = argo.stage_container(job, stage)
    container.args = ["rayjob", "--config", argo.CONFIG_PATH]
    container.ports = None
    container.resources = argo.light_resources()
    container.env = [
        *(container.env or []),
        # Argo's own variables (fixed text, never a spec value): the RayJob's owner
        m.EnvVar(name=WORKFLOW_NAME_ENV, value="{{workflow.name}}"),
        m.EnvVar(name=WORKFLOW_UID_ENV, value="{{workflow.uid}}"),
    ]
    return m.Template(
        name=stage.name,
        metadata=m.Metadata(labels={argo.STAGE_LABEL: stage.name}),
        inputs=m.Inputs(artifacts=[argo.config_artifact(job, stage)]),
        container=container,
        outputs=argo.stage_outputs(stage),
        retry_strategy=argo.retry_strategy(job),
        active_deadline_seconds=argo.active_deadline(job),
    )
