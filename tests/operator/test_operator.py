"""The operator (kopf, real HTTP, kopf's own client) against the Kubernetes API emulator:
only what the real-cluster tests (tests/cluster/) do not cover. The emulator records every
call the operator makes (the RBAC rules are exactly what it uses), and these tests run
S3 artifact deletion and a slow Workflow deletion without a cluster. The lifecycle,
failures, suspend/resume, spec changes, TTL, restarts, leader election and API faults are
tested against the real kube-apiserver and Argo controller (test_platform.py,
test_resilience.py)."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from kube_emulator import EmulatorThread
from operator_harness import NS, WG, WP, WV, Cluster, job_manifest, wait_for

from psft.operator.main import OperatorThread
from psft.operator.rbac import OPERATOR_RULES

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(api) -> Cluster:
    return Cluster(api)


@pytest.fixture
def start_operator(kubeconfig) -> Iterator[Callable[..., OperatorThread]]:
    running: list[OperatorThread] = []

    def start(**kwargs) -> OperatorThread:
        kwargs.setdefault("namespaces", [NS])
        kwargs.setdefault("standalone", True)
        op = OperatorThread(**kwargs).start()
        running.append(op)
        return op

    yield start
    for op in running:
        if op._thread.is_alive():
            op.stop()


@pytest.fixture
def operator(start_operator) -> OperatorThread:
    return start_operator()


def _outputs(name: str, value: object) -> dict:
    return {"parameters": [{"name": name, "value": json.dumps(value)}]}


def _wf_name(job: str) -> str:
    return f"psft-{job}"


def test_finalizer_only_when_artifacts_are_deleted(cluster: Cluster, operator):
    cluster.create_job(job_manifest("keep"))
    manifest = job_manifest("wipe")
    manifest["spec"]["storage"]["deleteOnJobDeletion"] = True
    cluster.create_job(manifest)
    wait_for(lambda: cluster.job("wipe")["metadata"].get("finalizers") == ["psft.dev/artifacts"])
    cluster.wait_phase("keep", "Pending")
    assert not cluster.job("keep")["metadata"].get("finalizers")


def _operator_calls(emulator: EmulatorThread) -> set[tuple[str, str, str]]:
    """(API group, resource[/subresource], RBAC verb) of every call the operator made."""

    def verb(r) -> str:
        if r.params.get("watch") == "true":
            return "watch"
        method = r.method.value
        if method == "GET":
            return "get" if r.name else "list"
        return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]

    operator_agents = ("kopf/", "psft-operator")
    used = set()
    for r in emulator.requests_where(lambda r: r.resource is not None and r.resource.plural):
        if r.headers.get("User-Agent", "").startswith(operator_agents):
            plural = f"{r.resource.plural}/{r.subresource}" if r.subresource else r.resource.plural
            used.add((r.resource.group, plural, verb(r)))
    return used


def _allowed_calls() -> set[tuple[str, str, str]]:
    return {
        (group, resource, v)
        for rule in OPERATOR_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for v in rule["verbs"]
    }


def test_rbac_rules_cover_every_call(cluster: Cluster, emulator, operator):
    cluster.create_job(job_manifest("rb"))
    wf_name = _wf_name("rb")
    wait_for(lambda: cluster.workflow(wf_name))
    cluster.set_workflow_status(wf_name, {"phase": "Running"})
    cluster.wait_phase("rb", "Running")
    cluster.patch_job("rb", {"spec": {"suspend": True}})
    cluster.wait_phase("rb", "Suspended")

    used = _operator_calls(emulator)
    allowed = _allowed_calls()
    assert used - allowed == set()
    # and the rules ask for little more than what runs here (peering, artifact cleanup)
    assert allowed - used == {
        ("kopf.dev", "kopfpeerings", v) for v in ("list", "watch", "patch")
    } | {("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")} | {
        ("", "secrets", "get"),  # artifact cleanup (its own test)
        ("argoproj.io", "workflows", "delete"),  # restart on spec change (its own test)
        # kopf's peering may read its object on a real API server; not reached here
        ("kopf.dev", "kopfpeerings", "get"),
        ("kopf.dev", "clusterkopfpeerings", "get"),
        # checked by admission (OwnerReferencesPermissionEnforcement), never called: the
        # real-cluster tests run with that plugin on
        ("psft.dev", "psftjobs/finalizers", "update"),
    }


def test_deletion_removes_s3_artifacts_then_releases_the_job(cluster: Cluster, operator, tmp_path):
    from servers.seaweed import SeaweedS3

    s3 = SeaweedS3(tmp_path / "seaweed").start()
    try:
        bucket = s3.create_bucket("runs")
        cluster.core.create_namespaced_secret(
            NS,
            {
                "metadata": {"name": "s3-keys"},
                "stringData": {"accessKey": s3.access_key, "secretKey": s3.secret_key},
            },
        )
        storage = s3.storage_spec(bucket, secretRef={"name": "s3-keys"})
        storage["deleteOnJobDeletion"] = True
        created = cluster.create_job(job_manifest("wiped", storage=storage))
        cluster.wait_phase("wiped", "Pending")
        root = f"psft/{NS}/wiped/{created['metadata']['uid']}"
        client = s3.client()
        for key in (f"{root}/train/metrics.jsonl", f"{root}/train/final/model.safetensors"):
            client.put_object(bucket, key, io.BytesIO(b"x"), 1)
        client.put_object(bucket, f"psft/{NS}/other/u/keep.json", io.BytesIO(b"{}"), 2)

        cluster.delete_job("wiped")
        wait_for(
            lambda: (
                not cluster.objects.list_namespaced_custom_object(
                    "psft.dev", "v1alpha1", NS, "psftjobs"
                )["items"]
            ),
            what="the job to go",
        )
        remaining = [o.object_name for o in client.list_objects(bucket, recursive=True)]
        assert remaining == [f"psft/{NS}/other/u/keep.json"]
        assert cluster.workflows() == []
    finally:
        s3.stop()


def test_restart_waits_for_the_old_workflow_to_be_deleted(cluster: Cluster, operator):
    cluster.create_job(job_manifest("slow", restartPolicy="OnSpecChange"))
    wf_name = _wf_name("slow")
    old = wait_for(lambda: cluster.workflow(wf_name))
    # something (e.g. Argo's artifact GC) holds the old Workflow with a finalizer
    held = {"metadata": {"finalizers": ["example.com/hold"]}}
    cluster.objects.patch_namespaced_custom_object(WG, WV, NS, WP, wf_name, held)
    cluster.patch_job("slow", {"spec": {"psft": {"seed": 1}}})
    wait_for(lambda: cluster.workflow(wf_name)["metadata"].get("deletionTimestamp"))
    time.sleep(1)
    dying = cluster.workflow(wf_name)
    assert dying["metadata"]["uid"] == old["metadata"]["uid"]  # not adopted, not replaced
    release = {"metadata": {"finalizers": None}}
    cluster.objects.patch_namespaced_custom_object(WG, WV, NS, WP, wf_name, release)
    new = wait_for(
        lambda: (w := cluster.workflow(wf_name))["metadata"]["uid"] != old["metadata"]["uid"] and w,
        what="the new Workflow",
    )
    assert not new["metadata"].get("deletionTimestamp")
    assert new["metadata"]["annotations"] != old["metadata"]["annotations"]
