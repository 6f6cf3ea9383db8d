"""The Argo Workflow renderer: shape, determinism, pods, retries, RayJob, every example."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from workflow_examples import EXPECTED_ERRORS, REPO, example_files, psftjob_docs

from psft.workflows import argo, argo_ray
from psft.workflows.cli import main
from psft.workflows.pipeline import build_pipeline
from psft.workflows.spec import PSFTJob
from psft.workflows.stages import StageConfig
from psft.workflows.validate import InvalidJob, validate_job

K8S = "1.37.0"


def s3_doc(**spec: Any) -> dict[str, Any]:
    doc = {
        "apiVersion": "psft.dev/v1alpha1",
        "kind": "PSFTJob",
        "metadata": {"name": "qwen", "namespace": "ml", "uid": "0b5e-uid"},
        "spec": {
            "model": {"source": "s3://models/qwen"},
            "dataset": {"train": ["s3://data/train.parquet"]},
            "storage": {
                "type": "s3",
                "s3": {"endpoint": "minio:9000", "bucket": "runs", "secretRef": {"name": "s3"}},
            },
        },
    }
    for section, values in spec.items():
        if isinstance(values, dict):
            doc["spec"].setdefault(section, {}).update(values)
        else:
            doc["spec"][section] = values
    return doc


def render(**spec: Any) -> dict[str, Any]:
    return argo.render_workflow(validate_job(s3_doc(**spec)))


def multi_node_job(**spec: Any) -> PSFTJob:
    """A valid job with resources.nodes > 1 (its train step is a RayJob)."""
    job = validate_job(s3_doc(**spec))
    assert job.spec.resources.nodes > 1
    return job


def render_multi_node(**spec: Any) -> dict[str, Any]:
    return argo.render_workflow(multi_node_job(**spec))


def ray_objects(job: PSFTJob) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RayJob, ConfigMap) that the multi-node train step's supervisor creates."""
    train = next(s for s in build_pipeline(job) if s.kind == "train")
    return argo_ray.rayjob(job, train), argo_ray.config_map(job, train)


def templates(wf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in wf["spec"]["templates"]}


def tasks(wf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in templates(wf)["psft"]["dag"]["tasks"]}


def pod_of(wf: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """The Pod Argo would run for a container template (workflow-level fields merged)."""
    spec = wf["spec"]
    pod_spec = {
        "containers": [template["container"]],
        "volumes": spec["volumes"],
        "securityContext": spec["securityContext"],
        "serviceAccountName": spec["serviceAccountName"],
    }
    for src, dst in (
        ("nodeSelector", "nodeSelector"),
        ("tolerations", "tolerations"),
        ("podPriorityClassName", "priorityClassName"),
        ("schedulerName", "schedulerName"),
    ):
        if src in spec:
            pod_spec[dst] = spec[src]
    for key in ("nodeSelector", "tolerations", "priorityClassName", "schedulerName"):
        if key in template:  # a template's own value wins, as in Argo
            pod_spec[key] = template[key]
    labels = {**spec["podMetadata"]["labels"], **template["metadata"]["labels"]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "labels": labels},
        "spec": pod_spec,
    }


def test_workflow_shape_follows_the_pipeline() -> None:
    job = validate_job(s3_doc(grpo={"enabled": True, "prompts": ["s3://data/p.parquet"]}))
    wf = argo.render_workflow(job)
    assert wf["apiVersion"] == "argoproj.io/v1alpha1" and wf["kind"] == "Workflow"
    assert wf["metadata"]["name"] == "psft-qwen" and wf["metadata"]["namespace"] == "ml"
    assert wf["metadata"]["labels"]["psft.dev/job"] == "qwen"
    assert wf["metadata"]["labels"]["app.kubernetes.io/instance"] == "qwen"
    assert wf["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "psft.dev/v1alpha1",
            "blockOwnerDeletion": True,
            "controller": True,
            "kind": "PSFTJob",
            "name": "qwen",
            "uid": "0b5e-uid",
        }
    ]
    assert wf["spec"]["entrypoint"] == "psft"
    stages = build_pipeline(job)
    dag = tasks(wf)
    assert list(dag) == [s.name for s in stages] == [
        "prepare", "train", "eval", "grpo", "eval-grpo", "report",
    ]  # fmt: skip
    for stage in stages:
        assert dag[stage.name].get("dependencies", []) == list(stage.depends)
        template = templates(wf)[stage.name]
        assert template["container"]["command"] == ["psft"]
        assert template["container"]["args"] == [stage.kind, "--config", argo.CONFIG_PATH]
        (artifact,) = template["inputs"]["artifacts"]
        assert artifact["path"] == argo.CONFIG_PATH
        config = StageConfig.model_validate_json(base64.b64decode(artifact["raw"]["data"]))
        assert (config.stage, config.kind, config.target) == (stage.name, stage.kind, stage.target)
        assert config.run_root == "s3://runs/psft/ml/qwen/0b5e-uid"
        assert config.work_dir == argo.RUN_MIRROR and config.progress is False
        assert config.job.spec == job.spec
        assert template["metadata"]["labels"] == {"psft.dev/stage": stage.name}
    assert argo.check_workflow(wf) == []


def test_render_is_deterministic_and_ignores_status_and_annotations() -> None:
    doc = s3_doc()
    first = argo.render_workflow(validate_job(doc))
    assert argo.render_workflow(validate_job(copy.deepcopy(doc))) == first
    noisy = copy.deepcopy(doc)
    noisy["metadata"]["annotations"] = {"kopf.zalando.org/last-handled-configuration": "{}"}
    noisy["metadata"]["resourceVersion"] = "123"
    noisy["status"] = {"phase": "Running"}
    assert argo.render_workflow(validate_job(noisy)) == first
    changed = argo.render_workflow(validate_job(s3_doc(psft={"learningRate": 2e-6})))
    hash_key = argo.SPEC_HASH_ANNOTATION
    assert (
        changed["metadata"]["annotations"][hash_key] != first["metadata"]["annotations"][hash_key]
    )


def test_spec_values_never_reach_a_command_line() -> None:
    nasty = "s3://models/x; rm -rf / $(id) `id`"
    wf = render(model={"source": nasty}, resources={"image": "registry/trainer:1"})
    for template in wf["spec"]["templates"]:
        container = template.get("container")
        if container:
            assert nasty not in json.dumps(container["command"] + container["args"])
            data = template["inputs"]["artifacts"][0]["raw"]["data"]
            assert nasty in base64.b64decode(data).decode()
    assert "arguments" not in wf["spec"]


ARGO_TEMPLATES = "{{workflow.name}} {{inputs.parameters.x}} {{=sprig.env('HOME')}}"


def test_no_spec_string_reaches_argos_template_engine() -> None:
    """Argo substitutes {{...}} anywhere in a template (raw artifact data, resource manifests,
    labels): free-text spec strings with such text must reach the stage verbatim, and the
    manifest must contain none of it outside base64."""
    spec = {
        "model": {"source": "s3://models/{{workflow.name}}", "chatTemplate": ARGO_TEMPLATES},
        "dataset": {"systemPrompt": ARGO_TEMPLATES},
        "eval": {"systemPrompt": ARGO_TEMPLATES},
    }
    job = validate_job(s3_doc(**spec))
    ray_job = PSFTJob.model_validate(s3_doc(**spec, resources={"nodes": 2, "gpusPerNode": 8}))
    for wf in (argo.render_workflow(job), argo.render_workflow(ray_job)):
        text = json.dumps(wf)
        # our own use of Argo's variables: the multi-node supervisor's owner Workflow
        for variable in ("{{workflow.name}}", "{{workflow.uid}}"):
            text = text.replace(f'"value": "{variable}"', "")
        assert "{{" not in text
    train = templates(argo.render_workflow(job))["train"]
    config = StageConfig.model_validate_json(
        base64.b64decode(train["inputs"]["artifacts"][0]["raw"]["data"])
    )
    assert config.job.spec.dataset.system_prompt == ARGO_TEMPLATES
    assert config.job.spec.model.source == "s3://models/{{workflow.name}}"


def test_s3_keys_come_from_the_secret_only() -> None:
    wf = render()
    for name, template in templates(wf).items():
        if name == "psft":
            continue
        env = {e["name"]: e for e in template["container"]["env"]}
        for var, key in (
            ("AWS_ACCESS_KEY_ID", "accessKey"),
            ("AWS_SECRET_ACCESS_KEY", "secretKey"),
        ):
            assert env[var] == {
                "name": var,
                "valueFrom": {"secretKeyRef": {"key": key, "name": "s3"}},
            }
        assert "parameters" not in template.get("inputs", {})


GPU_PLACEMENT = {
    "nodeSelector": {"gpu": "h100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "training",
}


def test_pods_resources_scheduling_and_security() -> None:
    wf = render(
        resources={
            "gpusPerNode": 4,
            "cpu": "16",
            "memory": "128Gi",
            "shmSize": "32Gi",
            **GPU_PLACEMENT,
            "schedulerName": "volcano",
            "queue": "team-a",
            "serviceAccountName": "trainer",
        }
    )
    spec = wf["spec"]
    assert spec["schedulerName"] == "volcano"
    assert spec["serviceAccountName"] == "trainer"
    assert spec["podMetadata"]["annotations"] == {"scheduling.volcano.sh/queue-name": "team-a"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == argo.RUN_AS
    (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    for name, template in templates(wf).items():
        if name == "psft":
            continue
        container = template["container"]
        gpus = container["resources"]["requests"].get("nvidia.com/gpu")
        assert gpus == ("4" if name in ("train", "eval") else None), name
        assert container["resources"]["limits"].get("nvidia.com/gpu") == gpus
        assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["ports"] == [{"containerPort": 9400, "name": "metrics", "protocol": "TCP"}]
        kubernetes_validate.validate(pod_of(wf, template), K8S, strict=True)


def test_only_model_stages_get_the_training_size_and_gpu_placement() -> None:
    wf = render(
        resources={"gpusPerNode": 8, "cpu": "64", "memory": "512Gi", **GPU_PLACEMENT},
        grpo={"enabled": True, "prompts": ["s3://data/p.parquet"]},
    )
    spec = wf["spec"]
    # at the Workflow level they would reach every pod, resource-step pods included
    for key in ("nodeSelector", "tolerations", "podPriorityClassName", "affinity"):
        assert key not in spec, key
    stages = {name: t for name, t in templates(wf).items() if name != "psft"}
    assert set(stages) == {"prepare", "train", "eval", "grpo", "eval-grpo", "report"}
    for name, template in stages.items():
        pod = pod_of(wf, template)["spec"]
        requests = template["container"]["resources"]["requests"]
        limits = template["container"]["resources"]["limits"]
        if name in ("prepare", "report"):
            assert requests == {"cpu": "2", "memory": "8Gi"}, name
            assert limits == {"memory": "8Gi"}, name
            for key in GPU_PLACEMENT:
                assert key not in pod, (name, key)
        else:
            assert requests == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}, name
            assert limits == {"memory": "512Gi", "nvidia.com/gpu": "8"}, name
            for key, value in GPU_PLACEMENT.items():
                assert pod[key] == value, (name, key)
    # the multi-node train step (the RayJob's supervisor) carries no GPU placement either
    ray_job = multi_node_job(resources={"nodes": 2, **GPU_PLACEMENT})
    ray_wf = argo.render_workflow(ray_job)
    assert argo.check_workflow(ray_wf) == []
    step = templates(ray_wf)["train"]
    for key in (*GPU_PLACEMENT, "podPriorityClassName"):
        assert key not in step and key not in ray_wf["spec"], key
    # the Ray pods themselves are training pods
    ray, _ = ray_objects(ray_job)
    head = ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    for key, value in GPU_PLACEMENT.items():
        assert head[key] == value, key


def test_kueue_queue_label_and_cpu_device_requests_no_gpu() -> None:
    wf = render(resources={"queue": "research", "device": "cpu"}, monitoring={"metricsPort": 0})
    assert wf["spec"]["podMetadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    assert "annotations" not in wf["spec"]["podMetadata"]
    for name, template in templates(wf).items():
        if name != "psft":
            assert "nvidia.com/gpu" not in template["container"]["resources"]["requests"]
            assert "ports" not in template["container"]


def test_retries_only_infrastructure_failures() -> None:
    wf = render(backoffLimit=5)
    for name, template in templates(wf).items():
        if name == "psft":
            continue
        retry = template["retryStrategy"]
        assert retry["limit"] == 5 and retry["retryPolicy"] == "Always"
        # no maxDuration: Argo counts it from the first try, so it would end all retries
        assert retry["backoff"] == {"duration": "30s", "factor": 2, "cap": "10m"}
        assert retry["expression"] == argo.RETRY_EXPRESSION
        assert ">= 128" in retry["expression"] and '"Error"' in retry["expression"]
        assert 'contains "imminent node shutdown"' in retry["expression"]  # spot reclaim
    assert all("retryStrategy" not in t for t in render(backoffLimit=0)["spec"]["templates"])


def test_ttl_and_suspend_from_the_spec() -> None:
    wf = render(suspend=True, ttlSecondsAfterFinished={"success": 600, "failure": 86400})
    assert wf["spec"]["suspend"] is True
    assert wf["spec"]["ttlStrategy"] == {"secondsAfterFailure": 86400, "secondsAfterSuccess": 600}
    plain = render()
    assert "suspend" not in plain["spec"] and "ttlStrategy" not in plain["spec"]


def test_output_parameters_the_operator_reads() -> None:
    wf = render(grpo={"enabled": True, "prompts": ["s3://data/p.parquet"]})
    outputs = {
        name: t["outputs"]["parameters"][0] for name, t in templates(wf).items() if "outputs" in t
    }
    assert set(outputs) == {"train", "eval", "grpo", "eval-grpo"}
    assert outputs["train"]["name"] == argo.METRICS_PARAMETER == "metrics"
    assert outputs["train"]["valueFrom"] == {
        "default": "",
        "path": "/psft/work/run/train/summary.json",
    }
    assert outputs["eval"]["name"] == argo.EVAL_PARAMETER == "eval-results"
    assert outputs["eval-grpo"]["valueFrom"]["path"] == "/psft/work/run/eval-grpo/summary.json"
    assert outputs["eval"]["valueFrom"]["path"] == "/psft/work/run/eval/summary.json"


def test_local_storage_is_refused_with_the_field() -> None:
    doc = s3_doc()
    doc["spec"]["storage"] = {"type": "local"}
    with pytest.raises(InvalidJob) as exc:
        argo.render_workflow(validate_job(doc))
    assert [e.path for e in exc.value.errors] == ["spec.storage.type"]


def test_check_workflow_reports_keys_hera_would_drop() -> None:
    wf = render()
    broken = copy.deepcopy(wf)
    broken["spec"]["templates"][1]["container"]["gpuCount"] = 1
    broken["spec"]["bogus"] = True
    problems = argo.check_workflow(broken)
    assert problems == [
        "spec.bogus: dropped by the schema (unknown field?)",
        "spec.templates[1].container.gpuCount: dropped by the schema (unknown field?)",
    ]
    wrong_type = copy.deepcopy(wf)
    wrong_type["spec"]["templates"][1]["container"]["args"] = "train"
    assert argo.check_workflow(wrong_type)


def test_multi_node_training_is_a_rayjob() -> None:
    job = multi_node_job(
        resources={"nodes": 3, "gpusPerNode": 8, "queue": "team-a"}, backoffLimit=2
    )
    wf = argo.render_workflow(job)
    assert argo.check_workflow(wf) == []
    dag = tasks(wf)
    assert dag["train"]["dependencies"] == ["prepare"]
    assert dag["eval"]["dependencies"] == ["train"]
    # the train step runs the supervisor: small, no GPU, the stage config as for one node
    step = templates(wf)["train"]
    container = step["container"]
    assert container["args"] == ["rayjob", "--config", argo.CONFIG_PATH]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "8Gi"},
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[argo_ray.WORKFLOW_NAME_ENV] == "{{workflow.name}}"
    assert env[argo_ray.WORKFLOW_UID_ENV] == "{{workflow.uid}}"
    assert step["outputs"]["parameters"][0]["name"] == argo.METRICS_PARAMETER
    assert step["retryStrategy"]["limit"] == 2
    train_stage = build_pipeline(job)[1]
    assert step["inputs"]["artifacts"][0]["raw"]["data"] == argo.stage_config_data(job, train_stage)

    ray, config_map = ray_objects(job)
    kubernetes_validate.validate(config_map, K8S, strict=True)
    assert config_map["data"]["stage.json.b64"] == argo.stage_config_data(job, train_stage)
    assert ray["apiVersion"] == "ray.io/v1" and ray["kind"] == "RayJob"
    assert ray["metadata"]["name"] == "psft-qwen-train"
    assert ray["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert ray["metadata"]["labels"][argo.JOB_LABEL] == "qwen"
    assert ray["spec"]["entrypoint"] == "psft train --config /psft/config/stage.json.b64"
    assert ray["spec"]["backoffLimit"] == 2
    # the Ray cluster (every GPU of the job) goes as soon as the job ends
    assert ray["spec"]["shutdownAfterJobFinishes"] is True
    assert ray["spec"]["ttlSecondsAfterFinished"] == 0
    cluster = ray["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == argo_ray.RAY_VERSION
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    for template in (cluster["headGroupSpec"]["template"], workers["template"]):
        (container,) = template["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert "command" not in container and "args" not in container
        assert {"mountPath": "/psft/config", "name": "stage-config", "readOnly": True} in (
            container["volumeMounts"]
        )
        assert container["ports"][0]["name"] == argo_ray.RAY_METRICS_PORT_NAME
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        kubernetes_validate.validate(pod_template | {"template": template}, K8S, strict=True)


def test_ray_version_is_the_trainer_images_ray_and_gets_http_probes() -> None:
    """KubeRay probes Ray pods over HTTP only for rayVersion >= 2.53; below (or unset) it
    execs `wget`, which the trainer image lacks. The version is the image's own Ray,
    pinned in the Dockerfile and in constraints.txt."""
    dockerfile = (REPO / "images/trainer/Dockerfile").read_text()
    assert f"ARG RAY_VERSION={argo_ray.RAY_VERSION}\n" in dockerfile
    assert '"ray[default]==${RAY_VERSION}"' in dockerfile
    assert f"ray=={argo_ray.RAY_VERSION}\n" in (REPO / "constraints.txt").read_text()
    major, minor, *_ = (int(part) for part in argo_ray.RAY_VERSION.split("."))
    assert (major, minor) >= (2, 53)


def test_active_deadline_bounds_the_workflow_its_stages_and_the_rayjob() -> None:
    day = 86400
    wf = render(activeDeadlineSeconds=day)
    assert wf["spec"]["activeDeadlineSeconds"] == day
    stages = [t for name, t in templates(wf).items() if name != "psft"]
    assert stages and all(t["activeDeadlineSeconds"] == day for t in stages)
    ray_job = multi_node_job(resources={"nodes": 2}, activeDeadlineSeconds=day)
    ray_wf = argo.render_workflow(ray_job)
    assert argo.check_workflow(ray_wf) == []
    assert templates(ray_wf)["train"]["activeDeadlineSeconds"] == day
    ray, _ = ray_objects(ray_job)
    assert ray["spec"]["activeDeadlineSeconds"] == day

    plain = render()
    assert "activeDeadlineSeconds" not in json.dumps(plain)
    plain_ray, _ = ray_objects(multi_node_job(resources={"nodes": 2}))
    assert "activeDeadlineSeconds" not in plain_ray["spec"]
    for bad in (0, -5):
        with pytest.raises(InvalidJob) as exc:
            validate_job(s3_doc(activeDeadlineSeconds=bad))
        assert [e.path for e in exc.value.errors] == ["spec.activeDeadlineSeconds"]


DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def all_labels(wf: dict[str, Any], *children: dict[str, Any]) -> list[dict[str, str]]:
    """Every label map of a Workflow, of its templates and of the objects (RayJob,
    ConfigMap) created beside it, with the Ray pods' templates."""
    found = [wf["metadata"]["labels"], wf["spec"]["podMetadata"]["labels"]]
    for template in wf["spec"]["templates"]:
        found.append((template.get("metadata") or {}).get("labels") or {})
    for manifest in children:
        found.append(manifest["metadata"]["labels"])
        cluster = manifest.get("spec", {}).get("rayClusterSpec", {})
        groups = [cluster.get("headGroupSpec"), *cluster.get("workerGroupSpecs", [])]
        found += [g["template"]["metadata"]["labels"] for g in groups if g]
    return found


def test_longest_job_name_keeps_child_names_valid() -> None:
    # 52 characters, the most metadata.name allows; the cut of the last two falls on a "-"
    names = ["a" * 52, "a" * 26 + "-" + "b" * 25, "a" * 26 + "-" + "c" * 25]
    rayjobs = []
    for name in names:
        doc = s3_doc(resources={"nodes": 2}, grpo={"enabled": True, "prompts": ["s3://data/p"]})
        doc["metadata"]["name"] = name
        job = PSFTJob.model_validate(doc)
        wf = argo.render_workflow(job)
        # the Workflow name is also the value of Argo's workflows.argoproj.io/workflow label
        assert len(wf["metadata"]["name"]) <= 63
        for template in wf["spec"]["templates"]:
            # Argo's pod names (POD_NAMES=v2): <workflow>-<template>-<fnv32 of the node>
            pod_name = f"{wf['metadata']['name']}-{template['name']}-{2**32 - 1}"
            assert len(pod_name) <= 253 and DNS_1123_SUBDOMAIN.fullmatch(pod_name)
        ray, config_map = ray_objects(job)
        ray_name = ray["metadata"]["name"]
        assert len(ray_name) <= argo_ray.RAYJOB_NAME_MAX == 47, ray_name
        assert DNS_1035.fullmatch(ray_name) and ray_name.endswith("-train"), ray_name
        # the RayCluster KubeRay derives from it: <rayjob>-<5 characters>, at most 53
        assert len(ray_name) + 6 <= 53
        assert argo.render_workflow(job) == wf  # deterministic
        assert len(config_map["metadata"]["name"]) <= 253
        assert DNS_1123_SUBDOMAIN.fullmatch(config_map["metadata"]["name"])
        volumes = ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
        (config_volume,) = [v for v in volumes if v["name"] == "stage-config"]
        assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
        for labels in all_labels(wf, ray, config_map):
            for key, value in labels.items():
                assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), (key, value)
        rayjobs.append(ray_name)
    assert len(set(rayjobs)) == len(names), rayjobs
    short, _ = ray_objects(multi_node_job(resources={"nodes": 2}))
    assert short["metadata"]["name"] == "psft-qwen-train"


def test_volcano_rayjob_labels() -> None:
    ray, _ = ray_objects(
        multi_node_job(resources={"nodes": 2, "schedulerName": "volcano", "queue": "q1"})
    )
    assert ray["metadata"]["labels"]["ray.io/scheduler-name"] == "volcano"
    assert ray["metadata"]["labels"]["volcano.sh/queue-name"] == "q1"


EXAMPLES = example_files()


def example_job(path: Path, doc: dict[str, Any]) -> PSFTJob:
    """The validated job of an example; for one listed in EXPECTED_ERRORS, check that
    validation refuses it with exactly those fields, then parse it without the rules."""
    expected = EXPECTED_ERRORS.get(path.name)
    if expected is None:
        return validate_job(doc, str(path))
    with pytest.raises(InvalidJob) as exc:
        validate_job(doc, str(path))
    assert sorted({e.path for e in exc.value.errors}) == sorted(expected), exc.value
    return PSFTJob.model_validate(doc)


def rendered_examples() -> list[tuple[Path, PSFTJob, dict[str, Any]]]:
    """(file, job, Workflow) of every example that renders on a cluster, multi-node too."""
    out = []
    for path in EXAMPLES:
        for doc in psftjob_docs(path):
            job = example_job(path, doc)
            if not argo.cluster_errors(job):
                out.append((path, job, argo.render_workflow(job)))
    return out


def test_example_retries_have_no_max_duration_and_follow_backoff_limit() -> None:
    rendered = rendered_examples()
    assert {p.name for p, _, _ in rendered} >= {"multinode.yaml", "qwen2.5-7b-limo.yaml"}
    retried = 0
    for path, job, wf in rendered:
        for template in wf["spec"]["templates"]:
            retry = template.get("retryStrategy")
            if retry is None:
                continue
            retried += 1
            where = f"{path.name}: {template['name']}"
            assert "maxDuration" not in retry.get("backoff", {}), where
            assert retry["limit"] == job.spec.backoff_limit > 0, where
            assert retry["expression"] == argo.RETRY_EXPRESSION, where
    assert retried


ARGO_V4_REMOVED = frozenset({"semaphore", "mutex", "podPriority"})
"""Workflow keys Argo v4 removed (docs/upgrading.md: singular `semaphore`/`mutex` in
synchronization, `podPriority`); `semaphores`, `mutexes` and `podPriorityClassName` stay."""


def removed_keys(value: Any, path: str = "") -> list[str]:
    """Paths of ARGO_V4_REMOVED keys anywhere in a manifest, resource steps' ones too."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in ARGO_V4_REMOVED:
                found.append(where)
            if key == "manifest" and isinstance(item, str):
                item = yaml.safe_load(item)
            found += removed_keys(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += removed_keys(item, f"{path}[{i}]")
    return found


def test_no_example_workflow_uses_what_argo_v4_removed() -> None:
    rendered = rendered_examples()
    assert len(rendered) >= 5
    for path, _, wf in rendered:
        assert removed_keys(wf) == [], path.name
    # the walk does find them, also inside a resource step's manifest
    planted = copy.deepcopy(rendered[0][2])
    planted["spec"]["synchronization"] = {"semaphore": {"configMapKeyRef": {"key": "k"}}}
    planted["spec"]["podPriority"] = 1
    planted["spec"]["templates"].append(
        {"name": "x", "resource": {"manifest": json.dumps({"spec": {"mutex": {"name": "m"}}})}}
    )
    last = len(planted["spec"]["templates"]) - 1
    assert sorted(removed_keys(planted)) == [
        "spec.podPriority",
        "spec.synchronization.semaphore",
        f"spec.templates[{last}].resource.manifest.spec.mutex",
    ]


def test_expected_errors_name_existing_examples() -> None:
    assert set(EXPECTED_ERRORS) <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_renders_or_says_why_not(path: Path) -> None:
    for doc in psftjob_docs(path):
        job = example_job(path, doc)
        if argo.cluster_errors(job):
            with pytest.raises(InvalidJob):
                argo.render_workflow(job)
            continue
        wf = argo.render_workflow(job)
        assert argo.check_workflow(wf) == []
        assert templates(wf)["psft"]["dag"]["tasks"][0]["name"] == "prepare"


def test_cli_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(s3_doc()))
    assert main(["render", str(path)]) == 0
    wf = yaml.safe_load(capsys.readouterr().out)
    assert wf == argo.render_workflow(PSFTJob.model_validate(s3_doc()))
    local = s3_doc()
    local["spec"]["storage"] = {"type": "local"}
    path.write_text(yaml.safe_dump(local))
    assert main(["render", str(path)]) == 1
    assert "spec.storage.type" in capsys.readouterr().err


def _dockerfile_env_paths(path: Path) -> dict[str, str]:
    """Absolute paths the image's ENV lines point the stage's tools at."""
    text = path.read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for name, value in re.findall(r"(\w+)=(\S+)", line):
                if value.startswith("/") and ":" not in value:
                    found[name] = value
    return found


def test_every_folder_a_stage_writes_is_a_mounted_volume() -> None:
    """The root filesystem is read-only: HF_HOME, XDG_CACHE_HOME, TRITON_CACHE_DIR (and HOME)
    must lie on a volume, whether they come from the image or from the pod."""
    image_env = _dockerfile_env_paths(REPO / "images" / "trainer" / "Dockerfile")
    assert {"HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"} <= set(image_env)
    wf = render()
    for name, template in templates(wf).items():
        container = template.get("container")
        if not container:
            continue
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = [v["mountPath"] for v in container["volumeMounts"]]
        pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        writable = {
            k: v
            for k, v in {**image_env, **pod_env}.items()
            if k in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR")
        }
        for var, folder in writable.items():
            assert any(folder == m or folder.startswith(m.rstrip("/") + "/") for m in mounts), (
                name,
                var,
                folder,
                mounts,
            )


def test_compare_arms_are_parallel_branches_of_the_workflow() -> None:
    job = validate_job(s3_doc(compare={"enabled": True}))
    wf = argo.render_workflow(job)
    dag = tasks(wf)
    assert dag["train"]["dependencies"] == dag["train-sft"]["dependencies"] == ["prepare"]
    assert dag["eval-sft"]["dependencies"] == ["train-sft"]
    assert sorted(dag["report"]["dependencies"]) == ["eval", "eval-sft"]
    (artifact,) = templates(wf)["train-sft"]["inputs"]["artifacts"]
    config = StageConfig.model_validate_json(base64.b64decode(artifact["raw"]["data"]))
    assert config.objective == "sft" and config.psft_spec().objective == "sft"
    outputs = {n: t["outputs"]["parameters"][0] for n, t in templates(wf).items() if "outputs" in t}
    assert outputs["train-sft"]["valueFrom"]["path"] == "/psft/work/run/train-sft/summary.json"
    assert outputs["eval-sft"]["valueFrom"]["path"] == (
        "/psft/work/run/eval-train-sft/summary.json"
    )
    assert argo.check_workflow(wf) == []
