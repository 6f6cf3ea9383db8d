"""psft on a real cluster: real helm install, the operator as the chart's ServiceAccount,
the real Argo controller running the Workflows it creates, kwok pods standing in for GPUs.

What is real: kube-apiserver, etcd, controller-manager (garbage collector, namespaces,
service-account tokens), scheduler, the Argo Workflows controller, the KubeRay operator,
helm and kubectl. What is not: the containers (kwok marks pods Running and, on request,
exited) and Argo's executor, whose WorkflowTaskResult the test writes through the API
(servers/cluster/platform.py)."""

from __future__ import annotations

import json
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
    installed = Platform(plane)
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
    exit_codes: dict[str, int] | None = None,
    timeout: float = 180,
) -> list[str]:
    """Finish each stage pod as it starts (exit 0 unless exit_codes names its template)
    until the Workflow ends; returns the template names in the order they ran."""
    ran: list[str] = []
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
            code = (exit_codes or {}).get(template, 0)
            platform.finish_pod(pod, code, OUTPUTS, message=f"exit {code}")
        return None

    wait_for(step, timeout, f"Workflow {ns}/{wf} to finish (ran {ran})")
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
