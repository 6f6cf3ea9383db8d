"""The operator's resilience on the real cluster: killed mid-reconcile and started again, two
replicas with the chart's leader election (kopf peering), and API faults injected by a real
proxy between the operator and the real kube-apiserver.

Everything the operator does goes to the real API server (through tests/servers/faulty_proxy.py
where a test injects faults or counts requests); the real Argo controller runs the Workflows;
the operator runs with the chart's arguments (`--peering=psft-operator`, all namespaces) and
its ServiceAccount's token (servers/cluster/platform.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest
from servers.cluster.control_plane import ControlPlane, Process
from servers.cluster.platform import Platform, wait_for
from servers.faulty_proxy import FaultyProxy, Rule

pytestmark = pytest.mark.integration

NS = "ml"
JOBS = f"/apis/psft.dev/v1alpha1/namespaces/{NS}/psftjobs"
PEERING = "clusterkopfpeering/psft-operator"
WF_CREATE = rf"^/apis/argoproj\.io/v1alpha1/namespaces/{NS}/workflows(\?|$)"
OUTPUTS = {
    "metrics": {"steps": 4, "final": {"step": 4, "total_steps": 4, "loss": -0.5, "entropy": 0.9}},
    "eval-results": {
        "results": [{"checkpoint": "final", "benchmark": "aime24", "avg_at_k": 0.25, "k": 4}]
    },
}
# PSFTJob phase for each Argo Workflow phase (what a converged status shows)
PHASES = {"": "Pending", "Pending": "Pending", "Running": "Running", "Succeeded": "Succeeded"}


def manifest(name: str) -> dict[str, Any]:
    """A small valid job whose GPU stages tolerate the GPU nodes' taint (1 GPU each)."""
    return {
        "apiVersion": "psft.dev/v1alpha1",
        "kind": "PSFTJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"source": "smollm2-135m-instruct"},
            "dataset": {"train": ["s3://data/train.jsonl"], "maxResponseLength": 1024},
            "psft": {"batchSize": 8, "miniBatchSize": 4, "microBatchSize": 2},
            "eval": {"benchmarks": ["aime24"], "samples": 4},
            "resources": {
                "gpusPerNode": 1,
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
            },
            "storage": {
                "type": "s3",
                "s3": {"endpoint": "minio.ml:9000", "bucket": "runs", "secretRef": {"name": "s3"}},
            },
        },
    }


# ---- fixtures ----
@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    plane = ControlPlane(tmp_path_factory.mktemp("resilience"))
    plane.start()
    installed = Platform(plane)
    try:
        yield installed.install(operator=False)  # each test runs the operators it needs
    finally:
        installed.stop()
        plane.stop()


class Operators:
    """The operator processes and proxies of one test; all stopped at its end."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.running: list[Process] = []
        self.proxies: list[FaultyProxy] = []

    def proxy(self) -> FaultyProxy:
        """A proxy in front of the API server, serving its certificate (the operator's
        kubeconfig keeps the cluster's CA)."""
        plane = self.platform.plane
        proxy = FaultyProxy(
            plane.server,
            upstream_ca=plane.pki["ca"],
            certificate=(plane.pki["serving"], plane.pki["serving_key"]),
        ).start()
        self.proxies.append(proxy)
        return proxy

    def start(self, name: str, proxy: FaultyProxy | None = None) -> Process:
        proc = self.platform.start_operator(name, server=proxy.url if proxy else None)
        self.running.append(proc)
        return proc

    def kill(self, proc: Process) -> None:
        """SIGKILL: no cleanup of any kind (kopf cannot leave the peering, nor finish a call)."""
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def logs(self) -> str:
        """The end of each operator's log and what each proxy did (for failure messages)."""
        parts = [
            f"--- {p.name} ---\n" + "\n".join(p.log.read_text(errors="replace").splitlines()[-25:])
            for p in self.running
        ]
        for i, proxy in enumerate(self.proxies):
            calls = [
                f"{r.method} {r.path.split('?')[0]} -> {r.status} {r.fault or ''}"
                for r in proxy.requests_where()
                if r.method != "GET"
            ]
            rules = [f"{r.action} {r.method} {r.path}: {r.hits} hits" for r in proxy.rules]
            parts.append(f"--- proxy {i}: {rules}\n" + "\n".join(calls[-25:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.clear()  # held calls end first: an operator stops only once its handlers do
        for proc in self.running:
            proc.stop()
        for proxy in self.proxies:
            proxy.stop()


def _cleanup(platform: Platform) -> None:
    """No job, and no peer left in the peering object by an operator killed here (it would
    pause the next test's operator until its lease ran out)."""
    platform.plane.request(JOBS, method="DELETE")
    platform.kubectl("patch", PEERING, "--type=merge", "-p", '{"status": null}')


@pytest.fixture
def operators(platform: Platform) -> Iterator[Operators]:
    ops = Operators(platform)
    try:
        yield ops
    finally:
        ops.stop()
        _cleanup(platform)


# ---- what the tests look at ----
def create_jobs(platform: Platform, names: list[str]) -> dict[str, str]:
    """Creates the jobs (as the admin); returns their uids."""
    return {n: platform.plane.create(JOBS, manifest(n))["metadata"]["uid"] for n in names}


def workflows_of(platform: Platform, uids: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Every Workflow owned by each job (by owner uid, whatever its name)."""
    by_uid: dict[str, list[dict[str, Any]]] = {uid: [] for uid in uids.values()}
    for wf in platform.workflows(NS):
        for ref in wf["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "PSFTJob" and ref.get("uid") in by_uid:
                by_uid[ref["uid"]].append(wf)
    return {name: by_uid[uid] for name, uid in uids.items()}


def unconverged(platform: Platform, uids: dict[str, str], phases: set[str]) -> dict[str, str]:
    """Jobs whose status does not (yet) mirror their one Workflow, with why; empty when all
    do and every Workflow is in one of `phases`."""
    owned = workflows_of(platform, uids)
    why: dict[str, str] = {}
    for name in uids:
        wfs = owned[name]
        if len(wfs) != 1:
            why[name] = f"{len(wfs)} Workflows"
            continue
        (wf,) = wfs
        job = platform.job(NS, name)
        status = job.get("status") or {}
        wf_phase = (wf.get("status") or {}).get("phase") or ""
        created = {c["type"]: c["status"] for c in status.get("conditions") or []}
        if wf_phase not in phases:
            why[name] = f"Workflow {wf_phase or 'not started'}"
        elif status.get("workflowName") != wf["metadata"]["name"]:
            why[name] = f"status.workflowName {status.get('workflowName')!r}"
        elif status.get("phase") != PHASES.get(wf_phase):
            why[name] = f"phase {status.get('phase')!r} for a {wf_phase} Workflow"
        elif created.get("WorkflowCreated") != "True":
            why[name] = f"conditions {created}"
        elif status.get("observedGeneration") != job["metadata"]["generation"]:
            why[name] = f"observedGeneration {status.get('observedGeneration')}"
    return why


def wait_converged(
    platform: Platform,
    uids: dict[str, str],
    timeout: float,
    ops: Operators,
    phases: frozenset[str] = frozenset({"Running"}),
) -> None:
    last: dict[str, str] = {}

    def done() -> bool:
        nonlocal last
        last = unconverged(platform, uids, set(phases))
        return not last

    try:
        wait_for(done, timeout, "every job to have one Workflow and a converged status")
    except AssertionError:
        raise AssertionError(f"not converged after {timeout:.0f} s: {last}\n{ops.logs()}") from None


def wait(ops: Operators, predicate: Any, timeout: float, what: str) -> Any:
    """wait_for, with the end of the operators' logs when it times out."""
    try:
        return wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{ops.logs()}") from None


def handled(platform: Platform, name: str) -> dict[str, Any]:
    """The spec kopf recorded as handled (written once the job's handler succeeded)."""
    annotations = platform.job(NS, name)["metadata"].get("annotations") or {}
    return json.loads(annotations.get("psft.dev/last-handled-configuration", "{}"))


def drive_to_success(platform: Platform, workflows: list[str], timeout: float = 120) -> None:
    """Finish each stage pod of these Workflows as it starts (exit 0, with outputs), until
    Argo marks every Workflow Succeeded."""

    def step() -> bool:
        pending = []
        for wf in workflows:
            phase = (platform.workflow(NS, wf).get("status") or {}).get("phase")
            assert phase not in ("Failed", "Error"), f"{wf}: {phase}"
            if phase != "Succeeded":
                pending.append(wf)
                for pod in platform.running_pods(NS, wf):
                    platform.finish_pod(pod, 0, OUTPUTS, "exit 0")
        return not pending

    wait_for(step, timeout, f"Argo to run {workflows} to Succeeded")


def peers(platform: Platform) -> dict[str, Any]:
    body = platform.get("/apis/kopf.dev/v1/clusterkopfpeerings/psft-operator")
    return body.get("status") or {}


def keepalive(tap: FaultyProxy) -> tuple[str, int]:
    """(identity, priority) an operator announces in its peering keep-alives."""
    (first, *_) = tap.requests_where("PATCH", "/clusterkopfpeerings/psft-operator")
    ((identity, entry),) = json.loads(first.body)["status"].items()
    return identity, entry["priority"]


def creates_of(proxy: FaultyProxy, job: str) -> list[Any]:
    """The Workflow creates of one job that went through this proxy."""
    name = f'"psft-{job}"'.encode()
    return [r for r in proxy.requests_where("POST", WF_CREATE) if name in r.body]


def creates(proxy: FaultyProxy, status: int | None = None) -> list[Any]:
    return [r for r in proxy.requests_where("POST", WF_CREATE) if status in (None, r.status)]


def writes(proxy: FaultyProxy) -> list[Any]:
    """Every write to jobs, Workflows and Events (peering keep-alives are not counted)."""
    return [
        r
        for r in proxy.requests_where()
        if r.method in ("POST", "PUT", "PATCH", "DELETE") and "/kopf.dev/" not in r.path
    ]


# ---- 7. restarts and replicas ----
def test_operator_killed_mid_reconcile_restarts_without_duplicates_or_losses(
    platform: Platform, operators: Operators
) -> None:
    """SIGKILL while Workflows are being created and status written: some jobs fully done,
    some Workflows created whose answer never reached the operator (the crash between
    create and record), some creates not yet sent, one status write in flight. The next
    operator adopts what exists, creates what is missing, and every status converges."""
    proxy = operators.proxy()
    # creates: 4 go through, the next 4 reach the server but their answers never come back,
    # the rest hang before reaching it; and the 3rd status write's answer is lost
    lost = proxy.add(Rule("lose_response", "POST", WF_CREATE, skip=4, times=4, seconds=600))
    held = proxy.add(Rule("hang", "POST", WF_CREATE, skip=8, times=None, seconds=600))
    status_lost = proxy.add(
        Rule("lose_response", "PATCH", r"/psftjobs/[^/]+/status", skip=2, seconds=600)
    )
    first = operators.start("op-restart-1", proxy)
    names = [f"rs-{i}" for i in range(12)]
    uids = create_jobs(platform, names)

    def mid_way() -> bool:
        recorded = [n for n in names if (platform.job(NS, n).get("status") or {}).get("phase")]
        return lost.hits == 4 and held.hits == 4 and status_lost.hits == 1 and len(recorded) >= 2

    wait(operators, mid_way, 60, "the operator to be mid-way")
    operators.kill(first)
    proxy.clear()  # the held connections go; the next operator's calls all go through
    before = {
        wfs[0]["metadata"]["name"]: wfs[0]["metadata"]["uid"]
        for wfs in workflows_of(platform, uids).values()
        if wfs
    }
    assert len(before) == 8, sorted(before)  # 4 acknowledged + 4 whose answer was lost

    killed = time.monotonic()
    operators.start("op-restart-2", proxy)
    wait_converged(platform, uids, 100, operators)
    took = time.monotonic() - killed

    owned = workflows_of(platform, uids)
    assert all(len(wfs) == 1 for wfs in owned.values()), owned
    after = {wfs[0]["metadata"]["name"]: wfs[0]["metadata"]["uid"] for wfs in owned.values()}
    # what existed was adopted, not deleted and recreated
    assert {n: after[n] for n in before} == before
    # the second operator created exactly the 4 Workflows whose creates never got through
    second = [r for r in creates(proxy) if r.at > killed]
    assert [r.status for r in second].count(201) == 4, [r.status for r in second]
    assert set(r.status for r in second) <= {201, 409}, [r.status for r in second]
    print(f"restarted operator converged {took:.1f} s after the kill")


def test_two_replicas_one_acts_and_the_other_takes_over_when_it_is_killed(
    platform: Platform, operators: Operators
) -> None:
    """Two replicas with the chart's peering: one does all the writes, the other none; the
    active one is SIGKILLed with creates in flight; the standby takes over once its peer's
    lease runs out, creates the missing Workflows (one each) and finishes the jobs' status
    while Argo runs them to the end."""
    taps = {"op-peer-a": operators.proxy(), "op-peer-b": operators.proxy()}
    procs = {name: operators.start(name, tap) for name, tap in taps.items()}
    wait_for(lambda: len(peers(platform)) == 2, 30, "both replicas in the peering object")
    # each replica's keep-alive names its identity and priority; the highest one leads
    priority = {name: keepalive(tap)[1] for name, tap in taps.items()}
    assert {keepalive(tap)[0] for tap in taps.values()} == set(peers(platform)), peers(platform)
    assert len(set(priority.values())) == 2, priority  # equal priorities would pause both
    leader = max(priority, key=lambda n: priority[n])
    (standby,) = [n for n in procs if n != leader]

    early = create_jobs(platform, ["peer-0", "peer-1"])
    wait_converged(platform, early, 60, operators)
    assert writes(taps[standby]) == [], [(r.method, r.path) for r in writes(taps[standby])]
    assert len(creates(taps[leader], 201)) == 2

    # the leader is killed while creating the next jobs' Workflows
    held = taps[leader].add(Rule("hang", "POST", WF_CREATE, times=None, seconds=600))
    late = create_jobs(platform, ["peer-2", "peer-3"])
    wait_for(lambda: held.hits == 2, 30, "the leader's creates in flight")
    operators.kill(procs[leader])
    taps[leader].clear()
    killed = time.monotonic()
    assert writes(taps[standby]) == []  # still standing by: the dead leader's lease runs

    # Argo goes on without any operator: the first jobs' Workflows run to the end
    drive_to_success(platform, [f"psft-{n}" for n in early])
    wait_converged(platform, early, 90, operators, phases=frozenset({"Succeeded"}))
    wait_converged(platform, late, 60, operators)
    took = time.monotonic() - killed
    statuses = {n: platform.job(NS, n)["status"] for n in early}
    assert all(s["phase"] == "Succeeded" for s in statuses.values()), statuses
    assert all(s["metrics"]["entropy"] == 0.9 for s in statuses.values()), statuses
    assert len(creates(taps[standby], 201)) == 2  # exactly the two missing Workflows
    assert not [r for r in creates(taps[standby]) if r.status != 201 and r.status != 409]
    print(f"standby took over and converged {took:.1f} s after the leader's SIGKILL")


# ---- 8. API faults through a proxy ----
@pytest.fixture(scope="class")
def proxied(platform: Platform) -> Iterator[tuple[FaultyProxy, Operators]]:
    """One operator talking to the API server through a fault-injecting proxy."""
    ops = Operators(platform)
    try:
        proxy = ops.proxy()
        ops.start("op-faults", proxy)
        yield proxy, ops
    finally:
        ops.stop()
        _cleanup(platform)


@pytest.fixture
def proxy(proxied: tuple[FaultyProxy, Operators]) -> Iterator[FaultyProxy]:
    yield proxied[0]
    proxied[0].clear()


@pytest.fixture
def ops(proxied: tuple[FaultyProxy, Operators]) -> Operators:
    return proxied[1]


STARTED = frozenset({"", "Pending", "Running"})


def gaps(requests: list[Any]) -> list[float]:
    return [round(b.at - a.at, 2) for a, b in pairwise(requests)]


@pytest.mark.usefixtures("proxied")
class TestFaultsThroughAProxy:
    def test_5xx_on_create_and_429_with_retry_after_on_status_are_survived(
        self, platform: Platform, proxy: FaultyProxy, ops: Operators
    ) -> None:
        errors = [
            proxy.add(Rule("error", "POST", WF_CREATE, status=500, times=2)),
            proxy.add(Rule("error", "POST", WF_CREATE, status=503)),
        ]
        throttled = proxy.add(
            Rule("error", "PATCH", r"/psftjobs/err/status", status=429, retry_after=2)
        )
        uids = create_jobs(platform, ["err"])
        wait_converged(platform, uids, 60, ops, phases=STARTED)
        assert [e.hits for e in errors] == [2, 1] and throttled.hits == 1
        # each failure retried after a pause; a retry after the 429 (when the job's own
        # handler got it) finds its Workflow there (409) and adopts it
        posts = creates_of(proxy, "err")
        statuses = [r.status for r in posts]
        assert statuses[:4] == [500, 500, 503, 201] and set(statuses[4:]) <= {409}, statuses
        assert min(gaps(posts[:4])) >= 1.5, gaps(posts)
        assert len(workflows_of(platform, uids)["err"]) == 1

        # a job without a Workflow (the CRD admits it, validation refuses an unregistered
        # benchmark): its status write is the only one, so the retry after the 429 is the
        # handler's own, and waits Retry-After
        invalid = manifest("err-invalid")
        invalid["spec"]["eval"]["benchmarks"] = ["no-such-benchmark"]
        slow = proxy.add(
            Rule("error", "PATCH", r"/psftjobs/err-invalid/status", status=429, retry_after=3)
        )
        platform.plane.create(JOBS, invalid)
        wait(
            ops,
            lambda: (platform.job(NS, "err-invalid").get("status") or {}).get("phase") == "Invalid",
            30,
            "the invalid job's status",
        )
        writes_ = proxy.requests_where("PATCH", r"/psftjobs/err-invalid/status")
        statuses = [r.status for r in writes_]
        assert slow.hits == 1 and statuses[0] == 429 and statuses[-1] == 200, statuses
        assert set(statuses[1:-1]) <= {409}, statuses  # a race with kopf's own write
        assert gaps(writes_)[0] >= 2.9, gaps(writes_)  # Retry-After: 3 honoured

        # 500s on kopf's own writes (its progress annotations) after a spec change
        kopf_500 = proxy.add(
            Rule("error", "PATCH", r"/psftjobs/err(\?|$)", agent="kopf/", status=500, times=2)
        )
        suspend = '{"spec": {"suspend": true}}'
        platform.kubectl("patch", "-n", NS, "psftjob/err", "--type=merge", "-p", suspend)
        wait(
            ops,
            lambda: platform.workflow(NS, "psft-err")["spec"].get("suspend") is True,
            30,
            "the Workflow to be suspended",
        )
        wait(
            ops,
            lambda: platform.job(NS, "err")["status"]["phase"] == "Suspended",
            30,
            "Suspended",
        )
        wait(ops, lambda: kopf_500.hits == 2, 30, "kopf's two failed writes")

        wait(
            ops,
            lambda: (handled(platform, "err").get("spec") or {}).get("suspend") is True,
            30,
            "kopf's retried write of the handled spec",
        )
        assert len(workflows_of(platform, uids)["err"]) == 1

    def test_409_on_create_for_a_workflow_that_is_not_there_is_retried(
        self, platform: Platform, proxy: FaultyProxy, ops: Operators
    ) -> None:
        """A 409 for a Workflow that does not exist (yet: a namesake being deleted, a
        cache behind): the operator reads it, finds none, and tries again."""
        conflict = proxy.add(Rule("error", "POST", WF_CREATE, status=409))
        uids = create_jobs(platform, ["conflict"])
        wait_converged(platform, uids, 30, ops, phases=STARTED)
        assert conflict.hits == 1
        assert [r.status for r in creates_of(proxy, "conflict")] == [409, 201]
        posts = creates_of(proxy, "conflict")
        assert gaps(posts)[0] >= 4.5, gaps(posts)  # the operator's 5 s pause on this 409

    def test_a_create_whose_answer_is_lost_is_adopted_promptly(
        self, platform: Platform, proxy: FaultyProxy, ops: Operators
    ) -> None:
        """The create reaches the server (the Workflow exists) but the connection drops
        before the answer: the operator finds its Workflow (409 on the retry) and adopts it,
        creating no second one, within the few seconds its other API errors take."""
        lost = proxy.add(Rule("lose_response", "POST", WF_CREATE, seconds=0))
        uids = create_jobs(platform, ["lost-answer"])
        wait(ops, lambda: lost.hits == 1, 30, "the create whose answer is lost")
        created = platform.workflow(NS, "psft-lost-answer")["metadata"]["uid"]
        # the status is mirrored from the Workflow's own event meanwhile
        wait_converged(platform, uids, 20, ops, phases=STARTED)
        wait(
            ops,
            lambda: [r.status for r in creates_of(proxy, "lost-answer")] == [None, 409],
            10,
            "the operator to try again, find its Workflow and adopt it",
        )
        owned = workflows_of(platform, uids)["lost-answer"]
        assert [w["metadata"]["uid"] for w in owned] == [created]

    def test_a_stalled_watch_is_cut_and_the_operator_catches_up(
        self, platform: Platform, proxy: FaultyProxy, ops: Operators
    ) -> None:
        """The PSFTJob watch stops delivering (the job's ADDED event goes by undelivered),
        then the connection is cut: the operator watches again from where it was and
        handles the job. Then the same on the Workflow watch while the first stage ends:
        the job's status catches up after the cut."""
        (jobs_watch,) = wait(
            ops,
            lambda: [s for s in proxy.streams if "/psftjobs?" in s.path and "watch=" in s.path],
            30,
            "the operator's PSFTJob watch",
        )
        proxy.stall_streams(r"/psftjobs\?.*watch=", seconds=60)
        uids = create_jobs(platform, ["stalled"])
        wait(ops, lambda: jobs_watch.discarded > 0, 10, "the job's event to go by undelivered")
        assert not workflows_of(platform, uids)["stalled"]  # the operator has not seen it
        jobs_watch.cut()  # as a load balancer or a restarting API server would
        wait_converged(platform, uids, 60, ops)  # Running

        # the Workflow watch stalls while the first stage ends and Argo moves on (Argo acts
        # on a finished pod within about 10 s here); the status catches up after the cut
        wait(
            ops,
            lambda: [s for s in proxy.streams if "/workflows?" in s.path and "watch=" in s.path],
            30,
            "the operator's Workflow watch",
        )
        (wf_watch,) = proxy.stall_streams(r"/workflows\?.*watch=", seconds=60)
        (pod,) = wait(ops, lambda: platform.running_pods(NS, "psft-stalled"), 10, "prepare")
        platform.finish_pod(pod, 0, OUTPUTS, "exit 0")

        def prepare_phase() -> str | None:
            stages = platform.job(NS, "stalled")["status"].get("stages") or {}
            return (stages.get("prepare") or {}).get("phase")

        wait(ops, lambda: wf_watch.discarded > 0, 30, "Argo's update to go by undelivered")
        assert prepare_phase() != "Succeeded"  # the operator has not seen it
        wf_watch.cut()
        wait(ops, lambda: prepare_phase() == "Succeeded", 20, "the status to catch up")

    def test_a_failed_status_write_for_the_workflows_last_change_is_retried(
        self, platform: Platform, proxy: FaultyProxy, ops: Operators
    ) -> None:
        """The status write that mirrors the Workflow's end fails (500s while Argo ends it,
        here on `argo terminate`); once the API server answers again, the job shows
        Failed."""
        uids = create_jobs(platform, ["last-write"])
        wait_converged(platform, uids, 60, ops)
        wait(ops, lambda: handled(platform, "last-write"), 30, "the job's handler to be done")
        wf = "psft-last-write"
        failing = proxy.add(
            Rule("error", "PATCH", r"/psftjobs/last-write/status", status=500, times=None)
        )
        terminate = '{"spec": {"shutdown": "Terminate"}}'  # what `argo terminate` does
        platform.kubectl("patch", "-n", NS, f"workflow/{wf}", "--type=merge", "-p", terminate)

        def final_write_failed() -> bool:
            """Argo ended the Workflow (its last change) and the write of it failed: only
            the Workflow's final version maps to a Failed job."""
            done = platform.workflow(NS, wf)["metadata"]["labels"]
            return done.get("workflows.argoproj.io/completed") == "true" and any(
                r.status == 500
                and (json.loads(r.body).get("status") or {}).get("phase") == "Failed"
                for r in proxy.requests_where("PATCH", r"/psftjobs/last-write/status")
            )

        wait(ops, final_write_failed, 30, "Argo to end the Workflow, and that write to fail")
        proxy.clear()  # the API server answers again; Argo has nothing more to say
        wait(
            ops,
            lambda: platform.job(NS, "last-write")["status"]["phase"] == "Failed",
            10,
            f"the job to show Failed once the API answers again ({failing.hits} writes failed)",
        )
