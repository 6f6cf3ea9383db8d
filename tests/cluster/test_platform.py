"""psft on a real cluster: real helm install, the operator as the chart's ServiceAccount,
the real Argo controller running the Workflows it creates, kwok pods standing in for GPUs.

What is real: kube-apiserver, etcd, controller-manager (garbage collector, namespaces,
service-account tokens), scheduler, the Argo Workflows controller, the KubeRay operator,
helm and kubectl. What is not: the containers (kwok marks pods Running and, on request,
exited) and Argo's executor, whose WorkflowTaskResult the test writes through the API
(servers/cluster/platform.py)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers.cluster.control_plane import ControlPlane
from servers.cluster.platform import Platform, template_name, wait_for

from psft.workflows.validate import validate_job

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRAIN_SUMMARY = {
    "steps": 12,
    "final": {"step": 12, "total_steps": 12, "loss": -0.71, "entropy": 0.83, "clip_fraction": 0.04},
}
EVAL_SUMMARY = {
    "results": [
        {"checkpoint": "final", "benchmark": "aime24", "avg_at_k": 0.25, "k": 32, "problems": 30},
        {"checkpoint": "final", "benchmark": "amc23", "avg_at_k": 0.5, "k": 32, "problems": 40},
    ]
}
OUTPUTS = {"metrics": TRAIN_SUMMARY, "eval-results": EVAL_SUMMARY}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    plane = ControlPlane(tmp_path_factory.mktemp("platform"))
    plane.start()
    installed = Platform(plane, helm_values=["workflows.rayJobs=true"])
    try:
        yield installed.install()
    finally:
        installed.stop()
        plane.stop()


def _example(name: str, tmp_path: Path, new_name: str | None = None) -> tuple[dict[str, Any], Path]:
    doc = yaml.safe_load((REPO / "examples" / name).read_text())
    if new_name:
        doc["metadata"]["name"] = new_name
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return doc, path


def _workflow_of(platform: Platform, ns: str, job: str) -> dict[str, Any]:
    def created() -> dict[str, Any] | None:
        status = platform.job(ns, job).get("status") or {}
        name = status.get("workflowName")
        return platform.workflow(ns, name) if name else None

    return wait_for(created, 60, f"the Workflow of {ns}/{job} ({platform.operator_log()[-3000:]})")


def _drive(
    platform: Platform,
    ns: str,
    wf: str,
    exit_codes: dict[str, list[int]] | None = None,
    timeout: float = 180,
    pod_specs: dict[str, dict[str, Any]] | None = None,
    pod_messages: dict[str, str] | None = None,
) -> list[str]:
    """Finish each stage pod as it starts, until the Workflow ends: with the next code of
    exit_codes[template] while there is one, else 0. Returns the templates as they ran."""
    ran: list[str] = []
    codes = {k: list(v) for k, v in (exit_codes or {}).items()}
    error: Exception | None = None

    def step() -> str | None:
        nonlocal error
        if error:
            return "error"
        try:
            return advance()
        except Exception as exc:
            error = exc
            return "error"

    def advance() -> str | None:
        phase = platform.workflow(ns, wf).get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed", "Error"):
            return phase
        for pod in platform.running_pods(ns, wf):
            template = template_name(pod)
            ran.append(template)
            if pod_specs is not None:
                pod_specs[template] = pod["spec"]
            code = codes[template].pop(0) if codes.get(template) else 0
            pod_message = (pod_messages or {}).pop(template, "") if code else ""
            platform.finish_pod(pod, code, OUTPUTS, f"exit {code}", pod_message)
        return None

    wait_for(step, timeout, f"Workflow {ns}/{wf} to finish")
    if error:
        raise error
    return ran


def test_helm_install_runs_the_operator_as_its_service_account(platform: Platform) -> None:
    crd = json.loads(platform.kubectl("get", "crd/psftjobs.psft.dev", "-o", "json").stdout)
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    assert "psft-workflow" in platform.kubectl("get", "sa", "-n", "ml").stdout
    whoami = platform.kubectl(
        f"--token={platform.operator_token(platform.operator_deployment()['spec']['template']['spec'])}",
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ).stdout
    assert whoami.startswith("system:serviceaccount:psft-system:")


def test_an_example_runs_through_every_stage_to_succeeded(platform: Platform, tmp_path) -> None:
    doc, path = _example("llama3.1-8b.yaml", tmp_path)
    ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
    platform.apply(path)
    wf = _workflow_of(platform, ns, name)
    # Argo's controller accepted it: it is running, not failed validation
    wait_for(
        lambda: (
            platform.workflow(ns, wf["metadata"]["name"]).get("status", {}).get("phase")
            == "Running"
        ),
        60,
        f"Argo to run the Workflow ({wf.get('status')})",
    )
    ran = _drive(platform, ns, wf["metadata"]["name"])
    final = platform.workflow(ns, wf["metadata"]["name"])
    assert final["status"]["phase"] == "Succeeded", final["status"].get("message")
    job = validate_job(doc)
    assert ran[0] == "prepare" and "train" in ran and "eval" in ran, ran
    status = wait_for(
        lambda: (s := platform.job(ns, name).get("status") or {}).get("phase") == "Succeeded" and s,
        60,
        "the PSFTJob to succeed",
    )
    assert status["metrics"]["entropy"] == 0.83 and status["metrics"]["step"] == 12
    assert status["bestAvgAtK"] == 0.5
    table = platform.kubectl("get", "psftjobs", "-n", ns).stdout
    assert "Succeeded" in table and "0.83" in table and "0.5" in table, table
    assert job.metadata.name == name


CLUSTER_EXAMPLES = sorted(
    path.name
    for path in (REPO / "examples").glob("*.yaml")
    if (doc := yaml.safe_load(path.read_text()))["spec"].get("storage", {}).get("type") == "s3"
    and doc["spec"].get("resources", {}).get("nodes", 1) == 1
)


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES)
def test_every_cluster_example_runs_as_rendered_pods_to_succeeded(platform, tmp_path, example):
    """Each one-node cluster example (multinode.yaml needs KubeRay; its RayJob is the
    subject of the supervisor's test below) applied as it is: Argo accepts its Workflow,
    every stage pod has the resources, labels, ServiceAccount, volumes and security
    context we render, and the job reaches Succeeded."""
    from psft.workflows import argo
    from psft.workflows.pipeline import build_pipeline

    name = "ex-" + example.removesuffix(".yaml").replace(".", "-")
    doc, path = _example(example, tmp_path, new_name=name)
    job = validate_job(doc)
    ns = job.metadata.namespace
    platform.apply(path)
    wf = _workflow_of(platform, ns, name)["metadata"]["name"]
    stages = {s.name: s for s in build_pipeline(job)}
    seen: dict[str, dict[str, Any]] = {}

    def progress() -> str:
        nodes = platform.workflow(ns, wf).get("status", {}).get("nodes") or {}
        pods = platform.pods(ns, wf)
        return json.dumps(
            {
                "nodes": {n["displayName"]: (n["phase"], n.get("message")) for n in nodes.values()},
                "pods": [
                    (p["metadata"]["name"], p["status"].get("phase"), p["status"].get("conditions"))
                    for p in pods
                ],
            }
        )[-3000:]

    try:
        ran = _drive(platform, ns, wf, timeout=240, pod_specs=seen)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {progress()}") from None
    assert platform.workflow(ns, wf)["status"]["phase"] == "Succeeded", ran
    assert set(seen) == set(stages), (sorted(seen), sorted(stages))
    for stage_name, pod in seen.items():
        stage = stages[stage_name]
        (main,) = [c for c in pod["containers"] if c["name"] == "main"]
        want = argo.resources(job, stage).model_dump(mode="json", exclude_none=True)
        got = {k: v for k, v in main["resources"].items() if v}
        assert got == want, (stage_name, got, want)
        assert main["args"] == [stage.kind, "--config", argo.CONFIG_PATH]
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        account = job.spec.resources.service_account_name or argo.DEFAULT_SERVICE_ACCOUNT
        assert pod["serviceAccountName"] == account
        mounts = {m["mountPath"] for m in main["volumeMounts"]}
        assert {"/dev/shm", argo.WORK_DIR, "/tmp", argo.CACHE_DIR} <= mounts
    status = _job_status(platform, ns, name, "Succeeded")
    assert status["metrics"]["step"] == 12 and "bestAvgAtK" in status


def _start(platform: Platform, tmp_path: Path, example: str, name: str) -> tuple[str, str]:
    doc, path = _example(example, tmp_path, new_name=name)
    ns = doc["metadata"]["namespace"]
    platform.apply(path)
    return ns, _workflow_of(platform, ns, name)["metadata"]["name"]


def _job_status(platform: Platform, ns: str, name: str, phase: str) -> dict[str, Any]:
    return wait_for(
        lambda: (s := platform.job(ns, name).get("status") or {}).get("phase") == phase and s,
        60,
        f"the PSFTJob {name} to reach {phase}",
    )


def test_a_train_pod_killed_by_a_signal_is_retried_and_the_job_goes_on(platform, tmp_path):
    ns, wf = _start(platform, tmp_path, "llama3.1-8b.yaml", "preempted")
    ran = _drive(platform, ns, wf, {"train": [137]}, timeout=240)
    assert ran.count("train") == 2, ran  # killed once (137: SIGKILL, OOM, eviction), then done
    assert platform.workflow(ns, wf)["status"]["phase"] == "Succeeded"
    status = _job_status(platform, ns, "preempted", "Succeeded")
    assert status["metrics"]["step"] == 12


def test_a_train_pod_stopped_by_a_node_shutdown_is_retried_whatever_its_exit_code(
    platform, tmp_path
):
    ns, wf = _start(platform, tmp_path, "llama3.1-8b.yaml", "spot-reclaimed")
    shutdown = "Pod was terminated in response to imminent node shutdown."
    ran = _drive(platform, ns, wf, {"train": [1]}, timeout=240, pod_messages={"train": shutdown})
    assert ran.count("train") == 2, ran
    _job_status(platform, ns, "spot-reclaimed", "Succeeded")


def test_an_application_failure_fails_the_job_at_once_with_its_message(platform, tmp_path):
    ns, wf = _start(platform, tmp_path, "llama3.1-8b.yaml", "broken-data")
    ran = _drive(platform, ns, wf, {"prepare": [2]})
    assert ran == ["prepare"]  # exit 2 is not retried
    assert platform.workflow(ns, wf)["status"]["phase"] == "Failed"
    status = _job_status(platform, ns, "broken-data", "Failed")
    text = json.dumps(status)
    assert "prepare" in text and "exit code 2" in text, text


def test_retries_carry_no_deadline_from_the_first_attempt(platform, tmp_path):
    ns, wf = _start(platform, tmp_path, "qwen2.5-7b-limo.yaml", "long-stage")
    templates = platform.workflow(ns, wf)["spec"]["templates"]
    assert not [t for t in templates if "maxDuration" in json.dumps(t.get("retryStrategy", {}))]
    strategies = [t["retryStrategy"] for t in templates if "retryStrategy" in t]
    assert strategies and all("maxDuration" not in (r.get("backoff") or {}) for r in strategies)
    specs: dict[str, dict[str, Any]] = {}
    _drive(platform, ns, wf, pod_specs=specs)
    nodes = {template: spec["nodeName"] for template, spec in specs.items()}
    # CPU-only stages stay off the tainted GPU nodes; the model stages land on them
    assert nodes["prepare"] == nodes["report"] == "cpu-0", nodes
    assert nodes["train"].startswith("gpu-") and nodes["eval"].startswith("gpu-"), nodes


def test_a_job_the_server_accepts_but_validation_refuses_is_marked_invalid(platform, tmp_path):
    doc, path = _example("multinode.yaml", tmp_path)
    # benchmark names are free strings to the CRD (`str | Model` items); only
    # validate_job knows the registered ones
    doc["spec"]["eval"]["benchmarks"] = ["no-such-benchmark"]
    path.write_text(yaml.safe_dump(doc))
    ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
    platform.apply(path)  # the CRD's schema and CEL rules admit it
    status = _job_status(platform, ns, name, "Invalid")
    assert "spec.eval.benchmarks[0]" in json.dumps(status)
    events = platform.kubectl(
        "get", "events", "-n", ns, f"--field-selector=involvedObject.name={name}", "-o", "json"
    ).stdout
    assert "spec.eval.benchmarks[0]" in events
    assert not [w for w in platform.workflows(ns) if name in w["metadata"]["name"]]


def test_a_namespace_without_the_workflow_service_account_is_reported_then_runs(platform, tmp_path):
    """The chart puts the stage pods' ServiceAccount only in workflows.namespaces: a job
    elsewhere waits with the fix in its status and an Event, and starts once it exists."""
    ns = "no-workflow-sa"
    platform.plane.create("/api/v1/namespaces", {"metadata": {"name": ns}})
    doc, path = _example("llama3.1-8b.yaml", tmp_path, new_name="elsewhere")
    doc["metadata"]["namespace"] = ns
    path.write_text(yaml.safe_dump(doc))
    platform.apply(path)

    def reported() -> dict[str, Any] | None:
        status = platform.job(ns, "elsewhere").get("status") or {}
        created = [c for c in status.get("conditions") or [] if c["type"] == "WorkflowCreated"]
        return created[0] if created and created[0]["reason"] == "ServiceAccountMissing" else None

    condition = wait_for(
        reported, 60, f"the missing ServiceAccount in status ({platform.operator_log()[-2000:]})"
    )
    assert f"workflows.namespaces={{{ns}}}" in condition["message"]
    assert platform.job(ns, "elsewhere")["status"]["phase"] == "Pending"
    events = platform.kubectl(
        "get", "events", "-n", ns, "--field-selector=involvedObject.name=elsewhere", "-o", "json"
    ).stdout
    assert "ServiceAccountMissing" in events
    assert not platform.workflows(ns)

    platform.plane.create(
        f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "psft-workflow"}}
    )
    wf = _workflow_of(platform, ns, "elsewhere")
    assert wf["spec"]["serviceAccountName"] == "psft-workflow"
    platform.kubectl("delete", "-n", ns, "psftjob/elsewhere", "--wait=false")


def test_a_finished_job_whose_workflow_argo_removed_is_not_run_again(platform, tmp_path):
    """ttlSecondsAfterFinished: Argo's own TTL controller deletes the finished Workflow; the
    job keeps its Succeeded record and the operator does not create the Workflow again, not
    even when it handles the job anew (an update, as after an operator restart)."""
    doc, path = _example("llama3.1-8b.yaml", tmp_path, new_name="short-lived")
    doc["spec"]["ttlSecondsAfterFinished"] = {"success": 2}
    path.write_text(yaml.safe_dump(doc))
    ns = doc["metadata"]["namespace"]
    platform.apply(path)
    workflow = _workflow_of(platform, ns, "short-lived")
    wf = workflow["metadata"]["name"]
    _drive(platform, ns, wf)
    status = _job_status(platform, ns, "short-lived", "Succeeded")
    wait_for(
        lambda: not [w for w in platform.workflows(ns) if w["metadata"]["name"] == wf],
        60,
        "Argo's TTL controller to delete the finished Workflow",
    )
    # the operator handles the job again: a label change is an update it reconciles
    platform.kubectl("label", "-n", ns, "psftjob/short-lived", "reviewed=yes")
    wait_for(
        lambda: (
            "reviewed"
            in (
                platform.job(ns, "short-lived")["metadata"]["annotations"].get(
                    "psft.dev/last-handled-configuration", ""
                )
            )
        ),
        30,
        "the operator to handle the update (kopf records what it handled)",
    )
    for _ in range(10):  # a window for a wrongly recreated Workflow to show up
        assert not [w for w in platform.workflows(ns) if w["metadata"]["name"] == wf]
        assert platform.job(ns, "short-lived")["status"]["phase"] == "Succeeded"
        time.sleep(0.5)
    kept = platform.job(ns, "short-lived")["status"]
    assert kept["metrics"] == status["metrics"] and kept["bestAvgAtK"] == status["bestAvgAtK"]


def _patch_spec(platform: Platform, ns: str, name: str, spec: dict[str, Any]) -> None:
    platform.kubectl(
        "patch", "-n", ns, f"psftjob/{name}", "--type=merge", "-p", json.dumps({"spec": spec})
    )


def test_suspend_resume_and_a_spec_change_refused_then_applied(platform, tmp_path):
    ns, wf = _start(platform, tmp_path, "llama3.1-8b.yaml", "lifecycle")
    _patch_spec(platform, ns, "lifecycle", {"suspend": True})
    wait_for(
        lambda: platform.workflow(ns, wf)["spec"].get("suspend") is True,
        30,
        "the Workflow to be suspended",
    )
    _job_status(platform, ns, "lifecycle", "Suspended")
    _patch_spec(platform, ns, "lifecycle", {"suspend": False})
    wait_for(lambda: not platform.workflow(ns, wf)["spec"].get("suspend"), 30, "resume")

    _patch_spec(platform, ns, "lifecycle", {"psft": {"learningRate": 2e-6}})  # Never: refused
    status = wait_for(
        lambda: (
            "restartPolicy" in json.dumps(platform.job(ns, "lifecycle").get("status"))
            and platform.job(ns, "lifecycle")["status"]
        ),
        30,
        "the refusal in the status",
    )
    old_uid = platform.workflow(ns, wf)["metadata"]["uid"]
    assert "OnSpecChange" in json.dumps(status)
    _patch_spec(platform, ns, "lifecycle", {"restartPolicy": "OnSpecChange"})

    def restarted() -> bool:
        current = platform.workflow(ns, wf)
        return current["metadata"]["uid"] != old_uid and not current["metadata"].get(
            "deletionTimestamp"
        )

    wait_for(restarted, 90, "the Workflow to be recreated with the new spec")
    (train,) = [t for t in platform.workflow(ns, wf)["spec"]["templates"] if t["name"] == "train"]
    config = json.loads(base64.b64decode(train["inputs"]["artifacts"][0]["raw"]["data"]))
    assert config["job"]["spec"]["psft"]["learningRate"] == 2e-6


def test_deleting_a_job_removes_its_workflow_and_pods_through_the_garbage_collector(
    platform, tmp_path
):
    ns, wf = _start(platform, tmp_path, "llama3.1-8b.yaml", "deleted")
    wait_for(lambda: platform.running_pods(ns, wf), 60, "the first stage pod")
    owner = platform.workflow(ns, wf)["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "PSFTJob" and owner["name"] == "deleted"
    platform.kubectl("delete", "-n", ns, "psftjob/deleted", "--wait=true", "--timeout=60s")

    def gone(path: str) -> bool:
        return platform.plane.request(path)[0] == 404

    wait_for(
        lambda: gone(f"/apis/argoproj.io/v1alpha1/namespaces/{ns}/workflows/{wf}"),
        60,
        "the garbage collector to delete the Workflow",
    )
    wait_for(lambda: not platform.pods(ns, wf), 60, "the Workflow's pods to go")


def test_argo_template_syntax_in_spec_strings_reaches_the_stage_verbatim(platform, tmp_path):
    from servers.cluster.platform import _argo_env

    text = "{{workflow.name}} {{inputs.parameters.x}} {{=sprig.env('HOME')}}"
    doc, path = _example("llama3.1-8b.yaml", tmp_path, new_name="braces")
    doc["spec"]["dataset"]["systemPrompt"] = text
    path.write_text(yaml.safe_dump(doc))
    platform.apply(path)
    ns = doc["metadata"]["namespace"]
    wf = _workflow_of(platform, ns, "braces")["metadata"]["name"]
    (pod,) = wait_for(lambda: platform.running_pods(ns, wf), 60, "the prepare pod")
    # what the executor receives after Argo's substitution: the resolved template
    resolved = json.loads(_argo_env(pod, "ARGO_TEMPLATE"))
    data = resolved["inputs"]["artifacts"][0]["raw"]["data"]
    config = json.loads(base64.b64decode(data))
    assert config["job"]["spec"]["dataset"]["systemPrompt"] == text
    _drive(platform, ns, wf)
    assert platform.workflow(ns, wf)["status"]["phase"] == "Succeeded"


def _start_supervisor(
    platform: Platform, config: Path, workflow: dict[str, Any], log: Path
) -> subprocess.Popen[str]:
    """`psft rayjob` as the multi-node train step's pod runs it: as the chart's workflow
    ServiceAccount (so the chart's Role authorises each call), with Argo's variables set.
    (The step's pod is on a kwok node, where no container runs: the test runs it here.)"""
    from psft.workflows import argo_ray

    ns = workflow["metadata"]["namespace"]
    token = platform.kubectl("create", "token", "psft-workflow", "-n", ns).stdout.strip()
    kubeconfig = platform.plane.write_kubeconfig(
        log.with_suffix(".kubeconfig"), token, "psft-workflow", ns
    )
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        argo_ray.WORKFLOW_NAME_ENV: workflow["metadata"]["name"],
        argo_ray.WORKFLOW_UID_ENV: workflow["metadata"]["uid"],
        "ARGO_PROGRESS_FILE": str(log.with_suffix(".progress")),
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    argv = [sys.executable, "-m", "psft.workflows.cli", "rayjob", "--config", str(config)]
    with log.open("w") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finished(process: subprocess.Popen[str], log: Path, timeout: float = 60) -> str:
    process.wait(timeout)
    return log.read_text()


def _set_rayjob_status(platform: Platform, ns: str, name: str, **status: str) -> None:
    """What KubeRay writes when the Ray job ends (its pods run no Ray here)."""
    platform.kubectl(
        "patch", "-n", ns, f"rayjob/{name}", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def test_the_rayjob_supervisor_creates_adopts_replaces_and_ends_with_kuberay(platform, tmp_path):
    """The multi-node train step against the real KubeRay operator, as the chart's workflow
    ServiceAccount: it creates the RayJob owned by the Workflow, which KubeRay accepts (not
    ValidationFailed) and turns into Ray pods on GPU nodes with HTTP probes; a retried step
    adopts the running RayJob instead of starting a second cluster; the step ends when
    KubeRay reports success; a rerun after that replaces the ended RayJob; a failure ends
    the step with KubeRay's reason and message."""
    from psft.workflows import argo, argo_ray
    from psft.workflows.pipeline import build_pipeline
    from psft.workflows.spec import PSFTJob
    from psft.workflows.stages import stage_config

    doc = yaml.safe_load((REPO / "examples" / "multinode.yaml").read_text())
    doc["metadata"]["name"] = "m" * 52  # the longest name: the RayJob name must fit 47
    doc["spec"]["resources"]["nodes"] = 2
    doc["spec"]["monitoring"] = {"enabled": False}  # no scrape of kwok's made-up pod IPs
    job = PSFTJob.model_validate(doc)
    ns = job.metadata.namespace
    priority = job.spec.resources.priority_class_name
    if priority:  # a platform team creates the example's PriorityClass
        platform.plane.create(
            "/apis/scheduling.k8s.io/v1/priorityclasses",
            {"metadata": {"name": priority}, "value": 1000},
        )
    # the owner: the job's Workflow, suspended (its steps are driven by hand here)
    manifest = argo.render_workflow(job)
    manifest["spec"]["suspend"] = True
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(manifest))
    platform.kubectl("create", "-n", ns, "-f", str(path))
    workflow = platform.workflow(ns, manifest["metadata"]["name"])
    train = next(s for s in build_pipeline(job) if s.kind == "train")
    config = tmp_path / "stage.json"
    config.write_text(stage_config(job, train, str(tmp_path / "run"), progress=False).dump())
    name = argo_ray.rayjob_name(job, train)
    assert len(name) <= 47
    rayjobs = f"/apis/ray.io/v1/namespaces/{ns}/rayjobs"

    first_log = tmp_path / "first.log"
    supervisor = _start_supervisor(platform, config, workflow, first_log)
    created = wait_for(lambda: platform.get(f"{rayjobs}/{name}"), 60, "the RayJob")
    (owner,) = created["metadata"]["ownerReferences"]
    assert owner["uid"] == workflow["metadata"]["uid"] and owner["blockOwnerDeletion"] is True

    def cluster_pods() -> list[dict[str, Any]]:
        rayjob = platform.get(f"{rayjobs}/{name}")
        assert rayjob.get("status", {}).get("jobDeploymentStatus") != "ValidationFailed", rayjob
        pods = platform.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=ray.io/is-ray-node%3Dyes")
        return [p for p in pods["items"] if p["spec"].get("nodeName")]

    pods = wait_for(lambda: len(cluster_pods()) >= 2 and cluster_pods(), 90, "the Ray pods")
    assert all(p["spec"]["nodeName"].startswith("gpu-") for p in pods)
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for p in pods
        for c in p["spec"]["containers"]
    ]
    assert "8" in gpus
    assert argo.CONFIG_FILE in json.dumps(pods[0]["spec"]["volumes"])
    # rayVersion >= 2.53: KubeRay probes over HTTP, not with exec probes running wget
    for pod in pods:
        ray_container = pod["spec"]["containers"][0]
        for probe in ("livenessProbe", "readinessProbe"):
            assert "exec" not in ray_container[probe], ray_container[probe]
            assert ray_container[probe]["httpGet"]["path"] == "/api/healthz"

    # the step's pod is lost (preempted) and Argo retries it: the retry adopts the RayJob
    supervisor.kill()
    supervisor.wait(10)
    retried_log = tmp_path / "retried.log"
    retried = _start_supervisor(platform, config, workflow, retried_log)
    wait_for(lambda: "adopting RayJob" in retried_log.read_text(), 60, "the retry to adopt it")
    _set_rayjob_status(platform, ns, name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    out = _finished(retried, retried_log)
    assert retried.returncode == 0, out
    assert f"RayJob {name} succeeded" in out
    assert platform.get(f"{rayjobs}/{name}")["metadata"]["uid"] == created["metadata"]["uid"]

    # `argo retry` (or a retried step) after the RayJob ended: a new RayJob, which fails
    rerun_log = tmp_path / "rerun.log"
    rerun = _start_supervisor(platform, config, workflow, rerun_log)
    replaced = wait_for(
        lambda: (
            (r := platform.get(f"{rayjobs}/{name}"))["metadata"]["uid"]
            != created["metadata"]["uid"]
            and r
        ),
        60,
        "the replacing RayJob",
    )
    assert replaced["metadata"]["ownerReferences"][0]["uid"] == workflow["metadata"]["uid"]
    _set_rayjob_status(
        platform, ns, name, jobDeploymentStatus="Failed", jobStatus="FAILED",
        reason="DeadlineExceeded", message="The RayJob has passed the activeDeadlineSeconds.",
    )  # fmt: skip
    out = _finished(rerun, rerun_log)
    assert rerun.returncode == 2, out
    assert "deleting RayJob" in out
    assert "reason DeadlineExceeded): The RayJob has passed the activeDeadlineSeconds." in out
    assert len(platform.get(rayjobs)["items"]) == 1  # never two Ray clusters
