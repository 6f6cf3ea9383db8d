"""psft installed on the test cluster the way the README says, and what drives its pods.

`Platform.install()` starts kwok GPU nodes, the Argo controller and the KubeRay operator on
a ControlPlane, runs real `helm install` of charts/psft, and starts the operator out of
cluster with the arguments of the chart's Deployment, authenticated by a token of the
chart's ServiceAccount: every API call it makes is authorised by the chart's RBAC.

Pods on kwok nodes run no containers, so nothing executes Argo's executor. `finish_pod`
does what the executor would do when a stage's main container exits: it writes the
WorkflowTaskResult (outputs, progress, `report-outputs-completed`) through the API, then
lets kwok terminate the pod with the chosen exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from k8s_tools import run_tool
from servers.cluster.control_plane import (
    EXIT_CODE_ANNOTATION,
    EXIT_MESSAGE_ANNOTATION,
    POD_MESSAGE_ANNOTATION,
    ControlPlane,
    Process,
)
from servers.seaweed import free_ports

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "psft"
RELEASE, SYSTEM_NS = "psft", "psft-system"
WF_LABEL = "workflows.argoproj.io/workflow"
GPU_NODE_LABELS = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",  # what the examples select
}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def wait_for(predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with suppress(Exception):
            if last := predicate():
                return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@dataclass
class Platform:
    plane: ControlPlane
    job_namespaces: tuple[str, ...] = ("ml",)
    helm_values: list[str] = field(default_factory=list)
    operator: Process | None = None

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_tool("kubectl", f"--kubeconfig={self.plane.kubeconfig}", *args, check=check)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_tool("helm", f"--kubeconfig={self.plane.kubeconfig}", *args, check=check)

    def get(self, path: str) -> dict[str, Any]:
        status, body = self.plane.request(path)
        if status != 200:
            raise LookupError(f"GET {path}: {status} {body}")
        return body

    # ---- installation ----
    def install(self, gpu_nodes: int = 2, operator: bool = True) -> Platform:
        """GPU nodes as GPU operators label and taint them, and one CPU node; then the
        operator, unless `operator` is False (tests that start their own)."""
        plane = self.plane
        plane.start_kwok()
        for i in range(gpu_nodes):
            plane.add_node(f"gpu-{i}", gpus=8, labels=GPU_NODE_LABELS, taints=[GPU_TAINT])
        plane.add_node("cpu-0", gpus=0)
        plane.start_argo()
        plane.start_kuberay()
        for ns in self.job_namespaces:
            plane.create("/api/v1/namespaces", {"metadata": {"name": ns}})
        values = [f"workflows.namespaces={{{','.join(self.job_namespaces)}}}", *self.helm_values]
        sets = [arg for v in values for arg in ("--set", v)]
        self.helm("install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace", *sets)
        if operator:
            self.start_operator()
        return self

    def operator_deployment(self) -> dict[str, Any]:
        items = self.get(f"/apis/apps/v1/namespaces/{SYSTEM_NS}/deployments")["items"]
        (deployment,) = [d for d in items if d["metadata"]["name"].endswith("operator")]
        return deployment

    def operator_token(self, pod_spec: dict[str, Any]) -> str:
        account = pod_spec["serviceAccountName"]
        return self.kubectl(
            "create", "token", account, "-n", SYSTEM_NS, "--duration=6h"
        ).stdout.strip()

    def start_operator(self, name: str = "operator", server: str | None = None) -> Process:
        """The chart's operator container, run here: its args, its ServiceAccount's token.

        `server`: the URL the operator reaches the API server at instead of the API server's
        own (a fault-injecting proxy in front of it, serving the API server's certificate)."""
        pod_spec = self.operator_deployment()["spec"]["template"]["spec"]
        (container,) = [c for c in pod_spec["containers"] if c["name"] == "operator"]
        kubeconfig = self.plane.write_kubeconfig(
            self.plane.folder / f"{name}.kubeconfig",
            self.operator_token(pod_spec),
            "operator",
            SYSTEM_NS,
        )
        if server:
            config = yaml.safe_load(kubeconfig.read_text())
            config["clusters"][0]["cluster"]["server"] = server
            kubeconfig.write_text(yaml.safe_dump(config))
        metrics_port, health_port = free_ports(2)
        argv = [
            sys.executable,
            "-m",
            "psft.workflows.cli",
            *container["args"],
            "--bind-address=127.0.0.1",
            f"--metrics-port={metrics_port}",
            f"--health-port={health_port}",
        ]
        env = {e["name"]: e.get("value", "") for e in container.get("env", []) if "value" in e}
        env |= {
            "KUBECONFIG": str(kubeconfig),
            "POD_NAME": name,
            "POD_NAMESPACE": SYSTEM_NS,
            "PSFT_LOG_LEVEL": os.environ.get("PSFT_LOG_LEVEL", "INFO"),
        }
        proc = self.plane._spawn(name, argv, env=env)
        self.plane._wait(
            name,
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2).status
                == 200
            ),
            timeout=90,
        )
        self.operator = proc
        return proc

    def operator_log(self) -> str:
        return self.operator.log.read_text(errors="replace") if self.operator else ""

    # ---- jobs, workflows, pods ----
    def apply(self, path: Path) -> None:
        self.kubectl("apply", "--validate=strict", "-f", str(path))

    def job(self, ns: str, name: str) -> dict[str, Any]:
        return self.get(f"/apis/psft.dev/v1alpha1/namespaces/{ns}/psftjobs/{name}")

    def workflows(self, ns: str) -> list[dict[str, Any]]:
        return self.get(f"/apis/argoproj.io/v1alpha1/namespaces/{ns}/workflows")["items"]

    def workflow(self, ns: str, name: str) -> dict[str, Any]:
        return self.get(f"/apis/argoproj.io/v1alpha1/namespaces/{ns}/workflows/{name}")

    def pods(self, ns: str, workflow: str) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{ns}/pods?labelSelector={WF_LABEL}%3D{workflow}"
        return self.get(path)["items"]

    def running_pods(self, ns: str, workflow: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.pods(ns, workflow)
            if p.get("status", {}).get("phase") == "Running"
            and EXIT_CODE_ANNOTATION not in p["metadata"].get("annotations", {})
        ]

    def finish_pod(
        self,
        pod: dict[str, Any],
        exit_code: int = 0,
        outputs: dict[str, Any] | None = None,
        message: str = "",
        pod_message: str = "",
    ) -> None:
        """What Argo's executor does at a stage's end (task result), then the exit itself."""
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        workflow = pod["metadata"]["labels"][WF_LABEL]
        wf = self.workflow(ns, workflow)
        node_id = _node_id(pod)
        (template,) = [t for t in wf["spec"]["templates"] if t["name"] == template_name(pod)]
        declared = [p["name"] for p in (template.get("outputs") or {}).get("parameters") or []]
        params = [
            {
                "name": n,
                "value": json.dumps(outputs[n]) if not isinstance(outputs[n], str) else outputs[n],
            }
            for n in declared
            if outputs and n in outputs and exit_code == 0
        ]
        result = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "WorkflowTaskResult",
            "metadata": {
                "name": node_id,
                "namespace": ns,
                "labels": {
                    WF_LABEL: workflow,
                    "workflows.argoproj.io/report-outputs-completed": "true",
                },
                "ownerReferences": [
                    {
                        "apiVersion": "argoproj.io/v1alpha1",
                        "kind": "Workflow",
                        "name": workflow,
                        "uid": wf["metadata"]["uid"],
                    }
                ],
            },
            "outputs": {"parameters": params} if params else {},
        }
        path = f"/apis/argoproj.io/v1alpha1/namespaces/{ns}/workflowtaskresults"
        status, body = self.plane.request(path, method="POST", body=result)
        if status == 409:
            status, body = self.plane.request(f"{path}/{node_id}", method="DELETE")
            status, body = self.plane.request(path, method="POST", body=result)
        assert status in (200, 201), body
        annotations = {EXIT_CODE_ANNOTATION: str(exit_code), EXIT_MESSAGE_ANNOTATION: message}
        if pod_message:
            annotations[POD_MESSAGE_ANNOTATION] = pod_message
        self.kubectl(
            "annotate",
            "-n",
            ns,
            f"pod/{name}",
            "--overwrite",
            *(f"{k}={v}" for k, v in annotations.items()),
        )

    def stop(self) -> None:
        if self.operator:
            self.operator.stop()


def _argo_env(pod: dict[str, Any], name: str) -> str:
    """A variable Argo sets on the executor's containers (ARGO_NODE_ID, ARGO_TEMPLATE)."""
    containers = [*pod["spec"]["containers"], *(pod["spec"].get("initContainers") or [])]
    for container in containers:
        for env in container.get("env") or []:
            if env["name"] == name and "value" in env:
                return env["value"]
    raise AssertionError(f"pod {pod['metadata']['name']} carries no {name}")


def _node_id(pod: dict[str, Any]) -> str:
    return _argo_env(pod, "ARGO_NODE_ID")


def template_of(pod: dict[str, Any]) -> dict[str, Any]:
    return json.loads(_argo_env(pod, "ARGO_TEMPLATE"))


def template_name(pod: dict[str, Any]) -> str:
    return template_of(pod)["name"]
