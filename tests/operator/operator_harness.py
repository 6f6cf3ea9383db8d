"""Driving the operator in tests: a client for jobs/Workflows and Argo-like status updates."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import kubernetes

NS = "ml"
G, V, P = "psft.dev", "v1alpha1", "psftjobs"
WG, WV, WP = "argoproj.io", "v1alpha1", "workflows"


def job_manifest(name: str, **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"source": "smollm2-135m-instruct"},
        "dataset": {"train": ["s3://data/train.jsonl"], "maxResponseLength": 1024},
        "psft": {"batchSize": 8, "miniBatchSize": 4, "microBatchSize": 2},
        "eval": {"benchmarks": ["aime24"], "samples": 4},
        "storage": {
            "type": "s3",
            "s3": {"endpoint": "minio.ml:9000", "bucket": "runs", "secretRef": {"name": "s3"}},
        },
    }
    spec.update(spec_overrides)
    return {"apiVersion": f"{G}/{V}", "kind": "PSFTJob", "metadata": {"name": name}, "spec": spec}


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
            last = None
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")


class Cluster:
    """The test's view of the emulated cluster, through the kubernetes client."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.objects = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)

    def create_job(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.objects.create_namespaced_custom_object(G, V, NS, P, manifest)

    def job(self, name: str) -> dict[str, Any]:
        return self.objects.get_namespaced_custom_object(G, V, NS, P, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.job(name).get("status") or {}

    def patch_job(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.objects.patch_namespaced_custom_object(G, V, NS, P, name, patch)

    def delete_job(self, name: str) -> None:
        self.objects.delete_namespaced_custom_object(G, V, NS, P, name)

    def workflows(self) -> list[dict[str, Any]]:
        return self.objects.list_namespaced_custom_object(WG, WV, NS, WP)["items"]

    def workflow(self, name: str) -> dict[str, Any]:
        return self.objects.get_namespaced_custom_object(WG, WV, NS, WP, name)

    def set_workflow_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """What Argo's controller does: write the Workflow's status (no status subresource)."""
        return self.objects.patch_namespaced_custom_object(WG, WV, NS, WP, name, {"status": status})

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = self.core.list_namespaced_event(NS).items
        return [
            (e.type, e.reason, e.message)
            for e in items
            if e.involved_object.name == name and e.involved_object.kind == "PSFTJob"
        ]

    def wait_status(
        self, name: str, predicate: Callable[[dict[str, Any]], Any], timeout: float = 30
    ) -> dict[str, Any]:
        """Wait until the job's status satisfies `predicate`; return that status."""

        def check() -> dict[str, Any] | None:
            status = self.status(name)
            return status if predicate(status) else None

        return wait_for(check, timeout, what=f"the status of {name}")

    def wait_phase(self, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait_status(name, lambda s: s.get("phase") == phase, timeout)

    def workflow_creates(self, emulator: Any) -> list[Any]:
        return emulator.requests_where(
            lambda r: r.method.value == "POST" and r.resource and r.resource.plural == WP
        )

    def condition(self, name: str, ctype: str) -> dict[str, Any] | None:
        conditions = self.status(name).get("conditions") or []
        return next((c for c in conditions if c["type"] == ctype), None)


def node(
    wf: str, stage: str, phase: str, progress: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An Argo node of a DAG task, as the controller records it."""
    out = {
        "id": f"{wf}-{stage}",
        "name": f"{wf}.{stage}",
        "displayName": stage,
        "type": "Pod",
        "templateName": stage,
        "phase": phase,
        "startedAt": "2026-01-01T00:00:00Z",
        **extra,
    }
    if progress:
        out["progress"] = progress
    return out


def nodes(*items: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in items}
