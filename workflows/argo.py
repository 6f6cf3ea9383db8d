"""The Argo Workflow of a PSFTJob, built with hera's typed models (Argo's own schema).

`render_workflow(job)` is pure and deterministic: the same job gives the same manifest,
so the operator can create it with a fixed name and treat 409 as "adopt". Each stage of
psft.workflows.pipeline becomes a DAG task whose pod runs `psft <kind> --config
/psft/config/stage.json.b64`; the StageConfig JSON arrives base64-encoded as a raw input
artifact, so no spec value ever reaches a shell or Argo's `{{...}}` substitution.
Multi-node training (`resources.nodes > 1`) is a step whose pod runs `psft rayjob`, which
creates a KubeRay RayJob (psft.workflows.argo_ray) and waits for its outcome.

`check_workflow(manifest)` parses a manifest with hera's models and diffs the round
trip: hera drops unknown keys silently, so a key it does not know shows up as a loss.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from hera.workflows import models as m

from psft.workflows import layout
from psft.workflows.pipeline import Stage, build_pipeline
from psft.workflows.spec import API_VERSION, KIND, PSFTJob
from psft.workflows.stages import ENCODED_SUFFIX, encode_stage_config, stage_config
from psft.workflows.validate import FieldError, InvalidJob

ARGO_API_VERSION = "argoproj.io/v1alpha1"
WORKFLOW_PREFIX = "psft-"
DEFAULT_SERVICE_ACCOUNT = "psft-workflow"
"""Service account of the stage pods unless spec.resources.serviceAccountName is set
(the chart creates it with the RBAC Argo's executor needs)."""

JOB_LABEL = "psft.dev/job"
STAGE_LABEL = "psft.dev/stage"
SPEC_HASH_ANNOTATION = "psft.dev/spec-hash"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"

CONFIG_DIR = "/psft/config"
CONFIG_FILE = f"stage.json{ENCODED_SUFFIX}"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
WORK_DIR = "/psft/work"
CACHE_DIR = "/psft/cache"
"""Model hub, Triton and XDG caches (vLLM and Triton write there): a volume of its own, since
the root filesystem is read-only. The trainer image points HF_HOME, XDG_CACHE_HOME and
TRITON_CACHE_DIR here; the pods set them too, so any image works."""
CACHE_ENV = {
    "HF_HOME": f"{CACHE_DIR}/huggingface",
    "XDG_CACHE_HOME": CACHE_DIR,
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
}
RUN_MIRROR = f"{WORK_DIR}/run"
"""Local mirror of the run root inside a pod (StageConfig.workDir)."""
RUN_AS = 1000
METRICS_PORT_NAME = "metrics"
METRICS_PARAMETER = "metrics"
EVAL_PARAMETER = "eval-results"

RETRY_EXPRESSION = (
    'lastRetry.status == "Error"'
    ' || (lastRetry.exitCode != "" && asInt(lastRetry.exitCode) >= 128)'
    ' || lastRetry.message contains "imminent node shutdown"'
)
"""Retry only infrastructure failures: Argo errors (pod deleted, node lost), deaths by
signal (exit code >= 128: OOM kill, eviction, preemption), and pods the kubelet stopped for
a node shutdown (spot reclaim), which Argo reports as Failed with the kubelet's message
"Pod was terminated in response to imminent node shutdown." whatever the exit code. A stage
that exits 1 or 2 on its own is an application failure and fails the job at once."""
MODEL_STAGE_KINDS = frozenset({"train", "eval", "grpo"})
"""Stages that load the model: they get spec.resources' CPU, memory and GPUs, and its
nodeSelector, tolerations and priorityClassName."""
LIGHT_STAGE_CPU = "2"
LIGHT_STAGE_MEMORY = "8Gi"
"""CPU and memory (request; memory is also the limit) of prepare (reads and tokenises the
data with the tokenizer only) and report (reads metrics, draws plots). They get no GPU
and none of spec.resources' placement, so they run on any node."""
RETRY_BACKOFF = "30s"
"""Delay before the first retry of a stage; each later one doubles it."""
RETRY_BACKOFF_CAP = "10m"
"""Longest delay between two tries of a stage."""


def workflow_name(job: PSFTJob) -> str:
    """Deterministic name of the job's Workflow (at most 57 characters)."""
    return WORKFLOW_PREFIX + job.metadata.name


def spec_hash(job: PSFTJob) -> str:
    """Short digest of the spec (defaults filled): changes exactly when the spec does."""
    canonical = json.dumps(job.spec.to_wire(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cluster_errors(job: PSFTJob) -> list[FieldError]:
    """What a valid PSFTJob still cannot do on a cluster."""
    errors = []
    if job.spec.storage.type == "local":
        errors.append(
            FieldError(
                "spec.storage.type",
                "'local' keeps the run in one machine's folder, but each stage runs in its "
                "own pod: use 's3' (with spec.storage.s3) on a cluster",
            )
        )
    return errors


def job_labels(job: PSFTJob, component: str = "workflow") -> dict[str, str]:
    """Labels of every object the job owns (the user's labels first, ours win)."""
    return {
        **job.metadata.labels,
        "app.kubernetes.io/name": "psft",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "psft",
        "app.kubernetes.io/managed-by": "psft-operator",
        JOB_LABEL: job.metadata.name,
    }


def queue_metadata(job: PSFTJob) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) that put pods in the spec's scheduler queue."""
    r = job.spec.resources
    if not r.queue:
        return {}, {}
    if r.scheduler_name == "volcano":
        return {}, {VOLCANO_QUEUE_ANNOTATION: r.queue}
    return {KUEUE_QUEUE_LABEL: r.queue}, {}


def owner_references(job: PSFTJob) -> list[m.OwnerReference] | None:
    if not job.metadata.uid:
        return None
    return [
        m.OwnerReference(
            api_version=API_VERSION,
            kind=KIND,
            name=job.metadata.name,
            uid=job.metadata.uid,
            controller=True,
            block_owner_deletion=True,
        )
    ]


def _stage_job(job: PSFTJob) -> PSFTJob:
    """The job as stages see it: no status and no annotations, which change without the
    spec changing (kubectl and kopf write annotations) and would make renders differ."""
    meta = job.metadata.model_copy(update={"annotations": {}})
    return job.model_copy(update={"status": None, "metadata": meta})


def stage_config_json(job: PSFTJob, stage: Stage) -> str:
    """The stage.json a pod of this stage reads."""
    clean = _stage_job(job)
    config = stage_config(clean, stage, layout.run_root(clean), work_dir=RUN_MIRROR, progress=False)
    return config.model_dump_json(by_alias=True, exclude_none=True)


def stage_config_data(job: PSFTJob, stage: Stage) -> str:
    """stage.json as the Workflow carries it: base64, so Argo's `{{...}}` substitution never
    sees a spec string (psft.workflows.stages.ENCODED_SUFFIX)."""
    return encode_stage_config(stage_config_json(job, stage))


def runs_model(stage: Stage) -> bool:
    """Whether a stage loads the model to train, evaluate or roll out (MODEL_STAGE_KINDS)."""
    return stage.kind in MODEL_STAGE_KINDS


def stage_gpus(job: PSFTJob, stage: Stage) -> int:
    return 0 if job.spec.resources.device == "cpu" else stage.gpus


def resources(job: PSFTJob, stage: Stage) -> m.ResourceRequirements:
    """spec.resources' CPU, memory and GPUs for a stage that runs the model; the small
    LIGHT_STAGE_CPU / LIGHT_STAGE_MEMORY for prepare and report."""
    r = job.spec.resources
    if not runs_model(stage):
        return light_resources()
    requests = {"cpu": m.Quantity(r.cpu), "memory": m.Quantity(r.memory)}
    limits = {"memory": m.Quantity(r.memory)}
    gpus = stage_gpus(job, stage)
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = m.Quantity(str(gpus))
    return m.ResourceRequirements(requests=requests, limits=limits)


def light_resources() -> m.ResourceRequirements:
    """LIGHT_STAGE_CPU / LIGHT_STAGE_MEMORY and no GPU."""
    memory = m.Quantity(LIGHT_STAGE_MEMORY)
    return m.ResourceRequirements(
        requests={"cpu": m.Quantity(LIGHT_STAGE_CPU), "memory": memory}, limits={"memory": memory}
    )


def placement(job: PSFTJob, stage: Stage) -> dict[str, Any]:
    """nodeSelector, tolerations and priorityClassName of a stage's template: the spec's
    for a stage that runs the model, none for prepare and report, which then schedule on
    any node instead of waiting for (and holding a slot on) a GPU node."""
    r = job.spec.resources
    if not runs_model(stage):
        return {}
    return {
        "node_selector": dict(r.node_selector) or None,
        "tolerations": [m.Toleration(**t.model_dump()) for t in r.tolerations] or None,
        "priority_class_name": r.priority_class_name,
    }


def env(job: PSFTJob, stage: Stage) -> list[m.EnvVar]:
    """Environment of a stage container; S3 keys come from the Secret, never from values."""
    out = [
        m.EnvVar(name="PSFT_JOB", value=job.metadata.name),
        m.EnvVar(name="PSFT_STAGE", value=stage.name),
        m.EnvVar(name="HOME", value=WORK_DIR),
        m.EnvVar(name="PYTHONUNBUFFERED", value="1"),
        *(m.EnvVar(name=name, value=value) for name, value in CACHE_ENV.items()),
    ]
    s3 = job.spec.storage.s3
    if job.spec.storage.type == "s3" and s3 is not None and s3.secret_ref is not None:
        ref = s3.secret_ref
        for name, key in (
            ("AWS_ACCESS_KEY_ID", ref.access_key_key),
            ("AWS_SECRET_ACCESS_KEY", ref.secret_key_key),
        ):
            selector = m.SecretKeySelector(name=ref.name, key=key)
            out.append(m.EnvVar(name=name, value_from=m.EnvVarSource(secret_key_ref=selector)))
    return out


def volumes(job: PSFTJob) -> list[m.Volume]:
    shm = m.EmptyDirVolumeSource(
        medium="Memory", size_limit=m.Quantity(job.spec.resources.shm_size)
    )
    return [
        m.Volume(name="dshm", empty_dir=shm),
        m.Volume(name="work", empty_dir=m.EmptyDirVolumeSource()),
        m.Volume(name="tmp", empty_dir=m.EmptyDirVolumeSource()),
        m.Volume(name="cache", empty_dir=m.EmptyDirVolumeSource()),
    ]


def volume_mounts() -> list[m.VolumeMount]:
    return [
        m.VolumeMount(name="dshm", mount_path="/dev/shm"),
        m.VolumeMount(name="work", mount_path=WORK_DIR),
        m.VolumeMount(name="tmp", mount_path="/tmp"),
        m.VolumeMount(name="cache", mount_path=CACHE_DIR),
    ]


def container_security() -> m.SecurityContext:
    return m.SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=m.Capabilities(drop=["ALL"]),
    )


def pod_security() -> m.PodSecurityContext:
    return m.PodSecurityContext(
        run_as_non_root=True,
        run_as_user=RUN_AS,
        run_as_group=RUN_AS,
        fs_group=RUN_AS,
        seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
    )


def stage_container(job: PSFTJob, stage: Stage) -> m.Container:
    r = job.spec.resources
    port = job.spec.monitoring.metrics_port
    ports = None
    if job.spec.monitoring.enabled and port:
        ports = [m.ContainerPort(name=METRICS_PORT_NAME, container_port=port, protocol="TCP")]
    return m.Container(
        name="main",
        image=r.image,
        image_pull_policy=r.image_pull_policy,
        command=["psft"],
        args=[stage.kind, "--config", CONFIG_PATH],
        env=env(job, stage),
        resources=resources(job, stage),
        volume_mounts=volume_mounts(),
        ports=ports,
        security_context=container_security(),
    )


def stage_outputs(stage: Stage) -> m.Outputs | None:
    """Small JSON results the operator mirrors into status (absent file: empty value)."""
    if stage.kind in ("train", "grpo"):
        name, key = METRICS_PARAMETER, layout.stage_summary(stage.name)
    elif stage.kind == "eval":
        name, key = EVAL_PARAMETER, f"{layout.eval_dir(stage.target or 'train')}/summary.json"
    else:
        return None
    value_from = m.ValueFrom(path=f"{RUN_MIRROR}/{key}", default="")
    return m.Outputs(parameters=[m.Parameter(name=name, value_from=value_from)])


def retry_strategy(job: PSFTJob) -> m.RetryStrategy | None:
    """Up to spec.backoffLimit retries, 30s apart and doubling, at most RETRY_BACKOFF_CAP.

    No `maxDuration`: Argo measures it from the first attempt's start and fails the node
    once it has passed ("Max duration limit exceeded"; retried pods get it as their
    deadline), so a stage preempted after that long of training would never resume. The
    number of tries is bounded by `limit`; the job's time by spec.activeDeadlineSeconds.
    `cap` needs Argo 3.7; older controllers ignore it (the delays then keep doubling:
    30s * 2**(n-1) before retry n)."""
    limit = job.spec.backoff_limit
    if limit == 0:
        return None
    return m.RetryStrategy(
        limit=m.IntOrString(limit),
        retry_policy="Always",
        expression=RETRY_EXPRESSION,
        backoff=m.Backoff(duration=RETRY_BACKOFF, factor=m.IntOrString(2), cap=RETRY_BACKOFF_CAP),
    )


def config_artifact(job: PSFTJob, stage: Stage) -> m.Artifact:
    return m.Artifact(
        name="stage-config",
        path=CONFIG_PATH,
        raw=m.RawArtifact(data=stage_config_data(job, stage)),
    )


def active_deadline(job: PSFTJob) -> m.IntOrString | None:
    """spec.activeDeadlineSeconds for a template: Argo also stops each pod at the
    Workflow's own deadline, so this bounds any one try of a stage the same way."""
    seconds = job.spec.active_deadline_seconds
    return None if seconds is None else m.IntOrString(seconds)


def stage_template(job: PSFTJob, stage: Stage) -> m.Template:
    return m.Template(
        name=stage.name,
        metadata=m.Metadata(labels={STAGE_LABEL: stage.name}),
        inputs=m.Inputs(artifacts=[config_artifact(job, stage)]),
        container=stage_container(job, stage),
        outputs=stage_outputs(stage),
        retry_strategy=retry_strategy(job),
        active_deadline_seconds=active_deadline(job),
        **placement(job, stage),
    )


def _task(name: str, template: str, depends: tuple[str, ...]) -> m.DAGTask:
    return m.DAGTask(name=name, template=template, dependencies=list(depends) or None)


def build_workflow(job: PSFTJob) -> m.Workflow:
    """The Workflow as hera models (render_workflow gives the wire dict)."""
    from psft.workflows.argo_ray import supervisor_template

    errors = cluster_errors(job)
    if errors:
        raise InvalidJob(errors, job.metadata.name)
    spec = job.spec
    r = spec.resources
    stages = build_pipeline(job)
    multi_node = r.nodes > 1
    templates: list[m.Template] = []
    tasks: list[m.DAGTask] = []
    for stage in stages:
        if multi_node and stage.kind == "train":
            templates.append(supervisor_template(job, stage))
        else:
            templates.append(stage_template(job, stage))
        tasks.append(_task(stage.name, stage.name, stage.depends))
    entry = m.Template(name="psft", dag=m.DAGTemplate(tasks=tasks))
    queue_labels, queue_annotations = queue_metadata(job)
    ttl = spec.ttl_seconds_after_finished
    ttl_strategy = None
    if ttl.success is not None or ttl.failure is not None:
        ttl_strategy = m.TTLStrategy(
            seconds_after_success=ttl.success, seconds_after_failure=ttl.failure
        )
    return m.Workflow(
        api_version=ARGO_API_VERSION,
        kind="Workflow",
        metadata=m.ObjectMeta(
            name=workflow_name(job),
            namespace=job.metadata.namespace,
            labels=job_labels(job),
            annotations={SPEC_HASH_ANNOTATION: spec_hash(job)},
            owner_references=owner_references(job),
        ),
        spec=m.WorkflowSpec(
            entrypoint="psft",
            templates=[entry, *templates],
            active_deadline_seconds=spec.active_deadline_seconds,
            service_account_name=r.service_account_name or DEFAULT_SERVICE_ACCOUNT,
            suspend=True if spec.suspend else None,
            ttl_strategy=ttl_strategy,
            pod_gc=m.PodGC(strategy="OnPodSuccess"),
            pod_metadata=m.Metadata(
                labels={**job_labels(job, component="stage"), **queue_labels},
                annotations=queue_annotations or None,
            ),
            # nodeSelector, tolerations and priority class are per template (placement):
            # here they would also apply to prepare, report and resource-step pods
            scheduler_name=r.scheduler_name,
            security_context=pod_security(),
            volumes=volumes(job),
        ),
    )


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def render_workflow(job: PSFTJob) -> dict[str, Any]:
    """The Argo Workflow manifest of a job (pure; raises InvalidJob for cluster-only errors)."""
    manifest = _dump(build_workflow(job))
    problems = check_workflow(manifest)
    if problems:  # a bug in this module, not in the user's spec
        raise AssertionError("rendered Workflow fails hera's schema: " + "; ".join(problems))
    return manifest


def workflow_yaml(job: PSFTJob) -> str:
    return yaml.safe_dump(render_workflow(job), sort_keys=False, width=100)


def check_workflow(manifest: dict[str, Any]) -> list[str]:
    """Problems of a Workflow manifest: hera parse errors and keys its models drop."""
    try:
        parsed = m.Workflow.model_validate(manifest)
    except ValueError as exc:
        return [str(exc)]
    return diff(manifest, _dump(parsed))


def diff(before: Any, after: Any, path: str = "") -> list[str]:
    """Where two JSON values differ, as readable paths."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in before.keys() | after.keys():
            where = f"{path}.{key}" if path else str(key)
            if key not in after:
                out.append(f"{where}: dropped by the schema (unknown field?)")
            elif key not in before:
                out.append(f"{where}: added by the schema")
            else:
                out += diff(before[key], after[key], where)
        return sorted(out)
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{path}: {len(before)} items became {len(after)}"]
        return [
            d
            for i, (b, a) in enumerate(zip(before, after, strict=True))
            for d in diff(b, a, f"{path}[{i}]")
        ]
    if before != after or type(before) is not type(after):
        return [f"{path}: {before!r} became {after!r}"]
    return []
