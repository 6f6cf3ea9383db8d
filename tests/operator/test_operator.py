"""The operator (kopf, real HTTP, kopf's own client) against the Kubernetes API emulator."""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from kube_emulator import EmulatorThread
from operator_harness import NS, WG, WP, WV, Cluster, job_manifest, node, nodes, wait_for
from prometheus_client import generate_latest

from psft.operator import metrics
from psft.operator.main import OperatorThread
from psft.operator.rbac import OPERATOR_RULES
from psft.workflows.argo import check_workflow

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


def test_lifecycle_create_progress_succeed_delete(
    cluster: Cluster, emulator: EmulatorThread, start_operator
):
    health_port = _free_port()
    start_operator(liveness_endpoint=f"http://127.0.0.1:{health_port}/healthz")
    created = cluster.create_job(job_manifest("lc"))
    uid = created["metadata"]["uid"]

    wf = wait_for(lambda: cluster.workflow(_wf_name("lc")), what="the Workflow")
    assert check_workflow({k: v for k, v in wf.items() if k != "status"}) == []
    owner = wf["metadata"]["ownerReferences"]
    assert owner == [
        {
            "apiVersion": "psft.dev/v1alpha1",
            "kind": "PSFTJob",
            "name": "lc",
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert wf["metadata"]["labels"]["psft.dev/job"] == "lc"
    tasks = [t["name"] for t in wf["spec"]["templates"][0]["dag"]["tasks"]]
    assert tasks == ["prepare", "train", "eval", "report"]

    status = wait_for(
        lambda: cluster.status("lc").get("phase") == "Pending" and cluster.status("lc")
    )
    assert status["workflowName"] == "psft-lc" and status["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Valid": "True",
        "WorkflowCreated": "True",
    }
    assert status["artifacts"]["runRoot"] == f"s3://runs/psft/{NS}/lc/{uid}"
    assert urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz").status == 200

    # Argo starts the workflow; the train stage reports progress
    wf_name = _wf_name("lc")
    cluster.set_workflow_status(
        wf_name,
        {
            "phase": "Running",
            "startedAt": "2026-01-01T00:00:00Z",
            "nodes": nodes(
                node(wf_name, "prepare", "Succeeded", finishedAt="2026-01-01T00:01:00Z"),
                node(wf_name, "train", "Running", progress="5/20"),
            ),
        },
    )
    status = wait_for(
        lambda: cluster.status("lc").get("progress") == "5/20" and cluster.status("lc")
    )
    assert status["phase"] == "Running" and status["stage"] == "train"
    assert status["metrics"] == {"stage": "train", "step": 5, "totalSteps": 20}
    assert status["stages"]["prepare"]["phase"] == "Succeeded"
    assert cluster.condition("lc", "Training")["status"] == "True"
    training_since = cluster.condition("lc", "Training")["lastTransitionTime"]

    # more progress: same condition, no new transition time
    time.sleep(1.1)
    prog = nodes(
        node(wf_name, "prepare", "Succeeded", finishedAt="2026-01-01T00:01:00Z"),
        node(wf_name, "train", "Running", progress="12/20"),
    )
    cluster.set_workflow_status(wf_name, {"nodes": prog})
    cluster.wait_status("lc", lambda s: s.get("progress") == "12/20")
    assert cluster.condition("lc", "Training")["lastTransitionTime"] == training_since

    # success, with the stages' output parameters
    # the stages' summary.json files, as the trainer writes them
    final_metrics = {
        "steps": 20,
        "total_steps": 20,
        "final": {"step": 20, "loss": 0.25, "entropy": 0.61},
    }
    row = {"checkpoint": "final", "benchmark": "aime24", "avg_at_k": 0.125, "pass_at_k": 0.5}
    eval_results = {"target": "train", "results": [{**row, "k": 4, "problems": 30}]}
    cluster.set_workflow_status(
        wf_name,
        {
            "phase": "Succeeded",
            "finishedAt": "2026-01-01T02:00:00Z",
            "nodes": nodes(
                node(wf_name, "prepare", "Succeeded", finishedAt="2026-01-01T00:01:00Z"),
                node(
                    wf_name,
                    "train",
                    "Succeeded",
                    progress="20/20",
                    finishedAt="2026-01-01T01:00:00Z",
                    outputs={
                        "parameters": [{"name": "metrics", "value": json.dumps(final_metrics)}]
                    },
                ),
                node(
                    wf_name,
                    "eval",
                    "Succeeded",
                    finishedAt="2026-01-01T01:30:00Z",
                    outputs={
                        "parameters": [{"name": "eval-results", "value": json.dumps(eval_results)}]
                    },
                ),
                node(wf_name, "report", "Succeeded", finishedAt="2026-01-01T02:00:00Z"),
            ),
        },
    )
    status = wait_for(
        lambda: cluster.status("lc").get("phase") == "Succeeded" and cluster.status("lc")
    )
    assert status["metrics"]["entropy"] == 0.61 and status["metrics"]["loss"] == 0.25
    assert status["evalResults"]["eval/aime24"]["avgAtK"] == 0.125
    assert status["bestAvgAtK"] == 0.125
    assert status["finishedAt"] == "2026-01-01T02:00:00Z"
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Succeeded"] == ("True", "WorkflowSucceeded")
    assert conditions["Training"] == ("False", "StageSucceeded")
    assert conditions["Evaluating"] == ("False", "StageSucceeded")

    reasons = wait_for(
        lambda: (
            {r for _, r, _ in cluster.events("lc")} >= {"WorkflowCreated", "Running", "Succeeded"}
            and {r for _, r, _ in cluster.events("lc")}
        )
    )
    assert all(t == "Normal" for t, _, _ in cluster.events("lc"))
    assert "Failed" not in reasons

    # no hot loop: one more identical Workflow write changes nothing on the job
    before = cluster.job("lc")["metadata"]["resourceVersion"]
    cluster.set_workflow_status(wf_name, {"message": None})  # no-op write
    time.sleep(0.5)
    assert cluster.job("lc")["metadata"]["resourceVersion"] == before
    status_writes = emulator.requests_where(
        lambda r: r.method.value == "PATCH" and r.subresource == "status" and r.name == "lc"
    )
    assert len(status_writes) <= 6  # Pending, Running, 12/20, Succeeded (+ races)

    scraped = generate_latest(metrics.REGISTRY).decode()
    assert 'psft_jobs{phase="Succeeded"}' in scraped
    assert f'psft_job_entropy{{namespace="{NS}",psftjob="lc"}} 0.61' in scraped
    assert 'psft_stage_duration_seconds_count{stage="train"}' in scraped
    assert 'psft_reconcile_total{result="ok"}' in scraped

    # delete: no finalizer is needed (storage.deleteOnJobDeletion is false) and the
    # Workflow goes with its owner
    assert not cluster.job("lc")["metadata"].get("finalizers")
    cluster.delete_job("lc")
    wait_for(lambda: not cluster.workflows(), what="the Workflow to be garbage-collected")


def test_failed_workflow(cluster: Cluster, operator):
    cluster.create_job(job_manifest("fails"))
    wf_name = _wf_name("fails")
    wait_for(lambda: cluster.workflow(wf_name))
    cluster.set_workflow_status(
        wf_name,
        {
            "phase": "Failed",
            "nodes": nodes(
                node(wf_name, "prepare", "Succeeded"),
                node(wf_name, "train", "Failed", message="OOMKilled (exit code 137)"),
            ),
        },
    )
    status = wait_for(
        lambda: cluster.status("fails").get("phase") == "Failed" and cluster.status("fails")
    )
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and "stage train failed: OOMKilled" in failed["message"]
    assert status["stages"]["train"]["message"] == "OOMKilled (exit code 137)"
    warnings = wait_for(lambda: [e for e in cluster.events("fails") if e[0] == "Warning"])
    assert warnings[0][1] == "Failed" and "OOMKilled" in warnings[0][2]


def test_invalid_spec_creates_nothing(cluster: Cluster, operator, emulator):
    bad = job_manifest("bad", psft={"batchSize": 8, "miniBatchSize": 3})
    bad["spec"]["storage"] = {"type": "local"}
    cluster.create_job(bad)
    status = wait_for(
        lambda: cluster.status("bad").get("phase") == "Invalid" and cluster.status("bad")
    )
    valid = status["conditions"][0]
    assert valid["type"] == "Valid" and valid["status"] == "False"
    assert valid["reason"] == "InvalidSpec"
    assert "spec.psft.miniBatchSize: (3) must divide spec.psft.batchSize (8)" in valid["message"]
    warnings = wait_for(lambda: [e for e in cluster.events("bad") if e[0] == "Warning"])
    assert warnings[0][1] == "InvalidSpec" and "miniBatchSize" in warnings[0][2]
    # the cluster-only rule: local storage cannot be shared between stage pods
    bad2 = job_manifest("local", storage={"type": "local"})
    cluster.create_job(bad2)
    status = wait_for(
        lambda: cluster.status("local").get("phase") == "Invalid" and cluster.status("local")
    )
    assert "spec.storage.type" in status["conditions"][0]["message"]
    time.sleep(0.3)
    assert cluster.workflows() == []
    posts = emulator.requests_where(
        lambda r: r.method.value == "POST" and r.resource and r.resource.plural == "workflows"
    )
    assert posts == []


def test_suspend_and_resume(cluster: Cluster, operator):
    cluster.create_job(job_manifest("sus"))
    wf_name = _wf_name("sus")
    wait_for(lambda: cluster.workflow(wf_name))
    cluster.set_workflow_status(
        wf_name, {"phase": "Running", "nodes": nodes(node(wf_name, "prepare", "Running"))}
    )
    cluster.wait_phase("sus", "Running")
    cluster.patch_job("sus", {"spec": {"suspend": True}})
    wait_for(lambda: cluster.workflow(wf_name)["spec"].get("suspend") is True)
    cluster.wait_phase("sus", "Suspended")
    assert cluster.condition("sus", "Valid")["status"] == "True"  # suspend is not a spec change
    cluster.patch_job("sus", {"spec": {"suspend": False}})
    wait_for(lambda: "suspend" not in cluster.workflow(wf_name)["spec"])
    cluster.wait_phase("sus", "Running")
    reasons = [r for _, r, _ in cluster.events("sus")]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_spec_change_refused_then_restart_on_spec_change(cluster: Cluster, operator):
    cluster.create_job(job_manifest("chg"))
    wf_name = _wf_name("chg")
    first = wait_for(lambda: cluster.workflow(wf_name))
    cluster.patch_job("chg", {"spec": {"psft": {"learningRate": 2e-6}}})
    refused = wait_for(
        lambda: (c := cluster.condition("chg", "Valid")) and c["status"] == "False" and c
    )
    assert refused["reason"] == "SpecChangeRefused" and "restartPolicy" in refused["message"]
    assert cluster.workflow(wf_name)["metadata"]["uid"] == first["metadata"]["uid"]
    assert cluster.status("chg")["observedGeneration"] == 2
    warnings = wait_for(lambda: [e for e in cluster.events("chg") if e[1] == "SpecChangeRefused"])
    assert warnings[0][0] == "Warning"

    # with restartPolicy OnSpecChange the Workflow is recreated from the new spec
    cluster.patch_job("chg", {"spec": {"restartPolicy": "OnSpecChange"}})
    second = wait_for(
        lambda: (
            (w := cluster.workflow(wf_name))["metadata"]["uid"] != first["metadata"]["uid"] and w
        )
    )
    assert (
        second["metadata"]["annotations"]["psft.dev/spec-hash"]
        != first["metadata"]["annotations"]["psft.dev/spec-hash"]
    )
    wait_for(lambda: cluster.condition("chg", "Valid")["status"] == "True")
    assert len(cluster.workflows()) == 1
    assert "Restarting" in [r for _, r, _ in cluster.events("chg")]


def test_operator_restart_mid_way(cluster: Cluster, emulator, start_operator):
    first = start_operator()
    cluster.create_job(job_manifest("rs"))
    wf_name = _wf_name("rs")
    wait_for(lambda: cluster.workflow(wf_name))
    cluster.wait_phase("rs", "Pending")
    first.stop()
    # the Workflow moves on while no operator runs
    cluster.set_workflow_status(
        wf_name,
        {
            "phase": "Running",
            "nodes": nodes(
                node(wf_name, "prepare", "Succeeded"),
                node(wf_name, "train", "Running", progress="3/9"),
            ),
        },
    )
    start_operator()
    status = wait_for(
        lambda: cluster.status("rs").get("progress") == "3/9" and cluster.status("rs")
    )
    assert status["phase"] == "Running"
    assert len(cluster.workflows()) == 1
    creates = emulator.requests_where(
        lambda r: r.method.value == "POST" and r.resource and r.resource.plural == "workflows"
    )
    assert len(creates) == 1


def test_api_errors_are_survived(cluster: Cluster, emulator, operator):
    # 500s on creating the Workflow, then a 429 with Retry-After on the status write
    create_500 = emulator.fail(500, method="POST", plural="workflows", times=2)
    status_429 = emulator.fail(
        429, method="PATCH", plural="psftjobs", subresource="status", retry_after=1
    )
    started = time.monotonic()
    cluster.create_job(job_manifest("err"))
    cluster.wait_phase("err", "Pending", timeout=20)
    assert create_500.hits == 2 and status_429.hits == 1
    assert time.monotonic() - started >= 1  # Retry-After honoured
    assert len(cluster.workflows()) == 1

    # 500s on kopf's own writes (its progress annotations) after a spec change
    kopf_500 = emulator.fail(500, method="PATCH", plural="psftjobs", agent="kopf/", times=2)
    cluster.patch_job("err", {"spec": {"suspend": True}})
    cluster.wait_phase("err", "Suspended", timeout=20)
    wait_for(lambda: kopf_500.hits == 2, what="kopf's retries")

    def handled() -> bool:  # kopf's retried write of the handled spec went through
        annotations = cluster.job("err")["metadata"].get("annotations") or {}
        last = json.loads(annotations.get("psft.dev/last-handled-configuration", "{}"))
        return (last.get("spec") or {}).get("suspend") is True

    wait_for(handled, timeout=20, what="kopf's handled-configuration annotation")
    assert len(cluster.workflows()) == 1


def test_conflict_on_create_adopts_the_existing_workflow(
    cluster: Cluster, emulator, start_operator
):
    # the operator died after creating the Workflow but before recording anything on the
    # job: the next operator sees a new job, creates its Workflow, gets 409 and adopts it
    created = cluster.create_job(job_manifest("adopt"))
    ref = {
        "apiVersion": "psft.dev/v1alpha1",
        "kind": "PSFTJob",
        "name": "adopt",
        "uid": created["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    existing = cluster.objects.create_namespaced_custom_object(
        "argoproj.io",
        "v1alpha1",
        NS,
        "workflows",
        {"metadata": {"name": _wf_name("adopt"), "ownerReferences": [ref]}, "spec": {}},
    )
    start_operator()
    status = cluster.wait_phase("adopt", "Pending")
    assert len(cluster.workflow_creates(emulator)) == 2  # ours above + the operator's 409
    assert [w["metadata"]["uid"] for w in cluster.workflows()] == [existing["metadata"]["uid"]]
    assert status["workflowName"] == _wf_name("adopt")


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


def test_peering_one_active_replica_and_takeover(cluster: Cluster, emulator, start_operator):
    cluster.objects.create_namespaced_custom_object(
        "kopf.dev", "v1", NS, "kopfpeerings", {"metadata": {"name": "psft-operator"}}
    )
    peers = {"standalone": False, "peering_name": "psft-operator"}
    leader = start_operator(priority=20, **peers)
    start_operator(priority=10, **peers)

    def registered() -> int:
        body = cluster.objects.get_namespaced_custom_object(
            "kopf.dev", "v1", NS, "kopfpeerings", "psft-operator"
        )
        return len(body.get("status") or {}) == 2

    wait_for(registered, what="both replicas in the peering object")
    cluster.create_job(job_manifest("led"))
    cluster.wait_phase("led", "Pending")
    time.sleep(0.5)
    assert len(cluster.workflow_creates(emulator)) == 1  # the standby did not act

    leader.stop()  # the standby takes over
    cluster.create_job(job_manifest("after"))
    cluster.wait_phase("after", "Pending")
    assert len(cluster.workflows()) == 2
    used = _operator_calls(emulator)
    assert used - _allowed_calls() == set()  # peering is in the rules


def test_finished_job_is_not_rerun_after_ttl_removes_its_workflow(
    cluster: Cluster, emulator, start_operator
):
    first = start_operator()
    cluster.create_job(job_manifest("ttl", ttlSecondsAfterFinished={"success": 60}))
    wf_name = _wf_name("ttl")
    wf = wait_for(lambda: cluster.workflow(wf_name))
    assert wf["spec"]["ttlStrategy"] == {"secondsAfterSuccess": 60}
    done = nodes(node(wf_name, "report", "Succeeded", finishedAt="2026-01-01T02:00:00Z"))
    cluster.set_workflow_status(wf_name, {"phase": "Succeeded", "nodes": done})
    cluster.wait_phase("ttl", "Succeeded")

    # Argo's TTL controller deletes the Workflow; the job keeps its record
    cluster.objects.delete_namespaced_custom_object(
        "argoproj.io", "v1alpha1", NS, "workflows", wf_name
    )
    time.sleep(0.5)
    status = cluster.status("ttl")
    assert status["phase"] == "Succeeded" and status["stages"]["report"]["phase"] == "Succeeded"

    # an operator restart resumes the job: it must not run it again
    first.stop()
    start_operator()
    time.sleep(1.5)
    assert cluster.workflows() == []
    assert len(cluster.workflow_creates(emulator)) == 1
    assert cluster.status("ttl")["phase"] == "Succeeded"

    # a spec change after it finished, with restartPolicy OnSpecChange: it runs again
    cluster.patch_job("ttl", {"spec": {"restartPolicy": "OnSpecChange", "psft": {"seed": 7}}})
    wait_for(lambda: cluster.workflow(wf_name), what="the rerun's Workflow")
    cluster.wait_phase("ttl", "Pending")


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


def test_cluster_wide_scope(cluster: Cluster, start_operator):
    start_operator(namespaces=[], clusterwide=True)
    manifest = job_manifest("anywhere")
    cluster.core.create_namespaced_service_account(
        "team-b", {"metadata": {"name": "psft-workflow"}}
    )
    cluster.objects.create_namespaced_custom_object(
        "psft.dev", "v1alpha1", "team-b", "psftjobs", manifest
    )
    wait_for(
        lambda: cluster.objects.get_namespaced_custom_object(
            WG, WV, "team-b", WP, _wf_name("anywhere")
        ),
        what="the Workflow in another namespace",
    )
