"""Load test of the operator: N PSFTJobs created at once, against the Kubernetes API emulator
or (--real) a real control plane with the real Argo Workflows controller.

Emulator mode (default): the emulator (tests/operator/kube_emulator.py) runs in this process
and timestamps, on the server side, when each job's Workflow is created and when each job
first shows phase Pending; the operator runs as a separate `psft operator` process.

Real mode (--real): a real control plane (tests/servers/cluster/control_plane.py: etcd,
kube-apiserver, controller-manager, scheduler) with kwok nodes, the Argo controller and
KubeRay; the chart is installed with real helm and the operator runs out of cluster as the
chart's ServiceAccount (tests/servers/cluster/platform.py). The figures are taken on the
client side: two watches (Workflows, PSFTJobs) in the job namespace, started before the
creates, timestamp each event on arrival ("pending" there: the first phase shown, Pending or
later). One warm-up job goes first and is left out of the figures: the operator answers
/healthz before its watches are live. `to_workflow_logged_*` is create -> the operator's
"created Workflow" log line; the rest of create -> ADDED is the API server's delivery.

Both modes sample the operator's memory and CPU from /proc and print p50/p99 latencies, the
operator's peak RSS and CPU per job, duplicate Workflows and lost jobs.

    .venv/bin/python benchmarks/operator_load.py --jobs 500
    .venv/bin/python benchmarks/operator_load.py --real --jobs 500

Targets (issue 5, emulator): p99 create->Workflow <= 5 s, RSS <= 250 MB, no duplicates, no
lost jobs. Targets (issue 12, real): p99 create->Workflow <= 2 s, no duplicates, no lost jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

import kubernetes  # noqa: E402
from kube_emulator import EmulatorThread, Key, KubeEmulator, Obj  # noqa: E402
from kubernetes.watch.watch import iter_resp_lines  # noqa: E402
from operator_harness import job_manifest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

NS = "bench"
GROUP, VERSION, JOBS = "psft.dev", "v1alpha1", "psftjobs"
ARGO, WORKFLOWS = "argoproj.io", "workflows"
WORKFLOW_PREFIX = "psft-"  # a job's Workflow is psft-<job> (psft.workflows.argo)
CREATED_LINE = re.compile(r"^(\S+ \S+) INFO kopf\.objects created Workflow (\S+)$")
WARMUP = "warmup"  # --real: the job created (and waited for) before the measured ones


# ---- shared: measurements ----
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> tuple[float, float]:
    """(current VmRSS, peak VmHWM) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class OperatorSampler:
    """The operator process's memory and CPU, from /proc: idle at creation, then sampled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.idle_rss, self.peak_rss = _rss_mb(pid)
        self.idle_cpu = _cpu_seconds(pid)

    def restart_cpu(self) -> None:
        """Counts CPU from now on (after a warm-up)."""
        self.idle_cpu = _cpu_seconds(self.pid)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, _rss_mb(self.pid)[1])

    def figures(self, jobs: int) -> dict[str, Any]:
        """Call while the operator still runs (after the load, before stopping it)."""
        final_rss, hwm = _rss_mb(self.pid)
        busy_cpu = _cpu_seconds(self.pid) - self.idle_cpu
        return {
            "operator_rss_idle_mb": round(self.idle_rss, 1),
            "operator_rss_final_mb": round(final_rss, 1),
            "operator_rss_peak_mb": round(max(hwm, self.peak_rss), 1),
            "operator_cpu_s": round(busy_cpu, 2),
            "operator_cpu_ms_per_job": round(1000 * busy_cpu / jobs, 1),
        }


def latency_figures(
    started: dict[str, float], workflow_at: dict[str, float], phase_at: dict[str, float]
) -> tuple[dict[str, Any], list[str]]:
    """p50/p99/max of create->Workflow and create->phase, per job; and the lost jobs (no
    Workflow or no phase)."""
    to_workflow = [workflow_at[n] - t for n, t in started.items() if n in workflow_at]
    to_phase = [phase_at[n] - t for n, t in started.items() if n in phase_at]
    lost = sorted(n for n in started if n not in workflow_at or n not in phase_at)
    figures = {
        "to_workflow_p50_s": round(_percentile(to_workflow, 0.5), 3),
        "to_workflow_p99_s": round(_percentile(to_workflow, 0.99), 3),
        "to_workflow_max_s": round(max(to_workflow, default=float("nan")), 3),
        "to_pending_p50_s": round(_percentile(to_phase, 0.5), 3),
        "to_pending_p99_s": round(_percentile(to_phase, 0.99), 3),
        "to_pending_max_s": round(max(to_phase, default=float("nan")), 3),
        "mean_to_workflow_s": round(statistics.fmean(to_workflow), 3) if to_workflow else None,
    }
    return figures, lost


def create_jobs(
    api: kubernetes.client.CustomObjectsApi, namespace: str, jobs: int, concurrency: int
) -> tuple[dict[str, float], float]:
    """Creates load-0000... from `concurrency` threads; returns ({job: t_create}, seconds)."""
    started: dict[str, float] = {}
    lock = threading.Lock()

    def create(i: int) -> None:
        name = f"load-{i:04d}"
        manifest = job_manifest(name)
        with lock:
            started[name] = time.monotonic()
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, JOBS, manifest)

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(create, range(jobs)))
    return started, time.monotonic() - t0


def report(figures: dict[str, Any], targets: dict[str, bool], json_path: Path | None) -> int:
    """The figures as a table, then one PASS/MISS line per target; 0 when all are met."""
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    for target, met in targets.items():
        print(f"{'PASS' if met else 'MISS'}  {target}")
    if json_path:
        json_path.write_text(json.dumps(figures, indent=2))
    return 0 if all(targets.values()) else 1


# ---- emulator mode ----
class TimedEmulator(KubeEmulator):
    """Records when each Workflow appears and when each job first reports Pending."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.workflow_added: dict[str, float] = {}
        self.workflow_adds: Counter[str] = Counter()
        self.pending_at: dict[str, float] = {}

    def _emit(self, etype: str, key: Key, obj: Obj) -> None:
        now = time.monotonic()
        resource, _, name = key
        if resource == "argoproj.io/v1alpha1/workflows" and etype == "ADDED":
            self.workflow_adds[name] += 1
            self.workflow_added.setdefault(name, now)
        if (
            resource == "psft.dev/v1alpha1/psftjobs"
            and (obj.get("status") or {}).get("phase") == "Pending"
        ):
            self.pending_at.setdefault(name, now)
        super()._emit(etype, key, obj)


class TimedEmulatorThread(EmulatorThread):
    async def _start(self) -> None:
        import kmock

        self.emulator = TimedEmulator()
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator)
        await self._server.__aenter__()


def run(jobs: int, concurrency: int, timeout: float, profile: Path | None = None) -> dict[str, Any]:
    with TimedEmulatorThread() as emu, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = emu.write_kubeconfig(Path(tmp) / "kubeconfig")
        # the stage pods' ServiceAccount (the chart creates it; the operator waits for it)
        emu.put_object(
            "v1/serviceaccounts", {"metadata": {"name": "psft-workflow", "namespace": NS}}
        )
        health_port = _free_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        argv = [sys.executable, "-m", "psft.workflows.cli", "operator", "--namespace", NS]
        if profile is not None:  # the event-loop thread only (kopf), not handler threads
            argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
        argv += ["--standalone", "--metrics-port", "0", "--health-port", str(health_port)]
        log = open(Path(tmp) / "operator.log", "wb")  # noqa: SIM115
        operator = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=1)
                    break
                except OSError:
                    if operator.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the operator did not start") from None
                    time.sleep(0.2)
            sampler = OperatorSampler(operator.pid)

            client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
            client.configuration.connection_pool_maxsize = concurrency
            api = kubernetes.client.CustomObjectsApi(client)
            t0 = time.monotonic()
            cpu0 = time.process_time()
            started, created_in = create_jobs(api, NS, jobs, concurrency)

            assert emu.emulator is not None
            timed: TimedEmulator = emu.emulator  # type: ignore[assignment]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = emu.call(lambda: len(timed.pending_at))
                sampler.sample()
                if done >= jobs:
                    break
                time.sleep(0.25)
            time.sleep(2)  # let late duplicates (if any) show up
            all_done_in = time.monotonic() - t0
            operator_figures = sampler.figures(jobs)
            emulator_cpu = time.process_time() - cpu0
            load = os.getloadavg()[0]
            workflow_added = emu.call(lambda: dict(timed.workflow_added))
            workflow_adds = emu.call(lambda: dict(timed.workflow_adds))
            pending_at = emu.call(lambda: dict(timed.pending_at))
            requests = emu.call(lambda: list(timed._requests))
            client.close()
        finally:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
            log.close()

    workflow_at = {name.removeprefix(WORKFLOW_PREFIX): t for name, t in workflow_added.items()}
    latencies, lost = latency_figures(started, workflow_at, pending_at)
    duplicates = sum(count - 1 for count in workflow_adds.values())
    status_writes = sum(
        1 for r in requests if r.subresource == "status" and r.method.value == "PATCH"
    )
    operator_calls = sum(
        1
        for r in requests
        if r.headers.get("User-Agent", "").startswith(("kopf/", "psft-operator"))
    )
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "create_seconds": round(created_in, 2),
        "all_pending_seconds": round(all_done_in, 2),
        **latencies,
        **operator_figures,
        "emulator_and_client_cpu_s": round(emulator_cpu, 2),
        "host_load_avg_1m": round(load, 2),
        "duplicate_workflows": duplicates,
        "lost_jobs": len(lost),
        "status_writes_per_job": round(status_writes / jobs, 2),
        "operator_api_calls_per_job": round(operator_calls / jobs, 2),
    }


def emulator_targets(figures: dict[str, Any]) -> dict[str, bool]:
    return {
        "p99 create->Workflow <= 5 s": figures["to_workflow_p99_s"] <= 5,
        "operator RSS <= 250 MB": figures["operator_rss_peak_mb"] <= 250,
        "no duplicate Workflows": figures["duplicate_workflows"] == 0,
        "no lost jobs": figures["lost_jobs"] == 0,
    }


# ---- real mode ----
class Watch(threading.Thread):
    """One watch of a namespaced custom resource; `on_event(type, object, t_arrival)` is
    called for every event, with the time.monotonic() at which its line arrived.

    This thread only reads and timestamps lines; a second thread parses them and calls
    `on_event`, so that parsing large objects (a Workflow is ~20 kB, and the Argo controller
    updates each one several times) does not delay the timestamps of the events behind."""

    def __init__(
        self,
        kubeconfig: Path,
        group: str,
        version: str,
        namespace: str,
        plural: str,
        on_event: Callable[[str, dict[str, Any], float], None],
    ) -> None:
        super().__init__(name=f"watch-{plural}", daemon=True)
        self.client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.api = kubernetes.client.CustomObjectsApi(self.client)
        self.where = (group, version, namespace, plural)
        self.on_event = on_event
        self.connected = threading.Event()
        self.reconnects = 0
        self.events = 0
        self.errors: list[str] = []
        self._version = ""  # of the last event parsed: where a reconnect starts from
        self._lines: queue.SimpleQueue[tuple[float, str] | None] = queue.SimpleQueue()
        self._parser = threading.Thread(target=self._parse, name=f"parse-{plural}", daemon=True)
        self._stopping = threading.Event()
        self._response: Any = None

    def _list_version(self) -> str:
        listed = self.api.list_namespaced_custom_object(*self.where, limit=1)
        return listed["metadata"]["resourceVersion"]

    def run(self) -> None:
        try:
            self._version = self._list_version()
        except Exception as exc:  # reported by the caller waiting for `connected`
            self.errors.append(repr(exc))
            return
        self._parser.start()
        while not self._stopping.is_set():
            try:
                # returns once the API server has sent the watch's response headers, which it
                # does after registering the watch: every later change is delivered
                self._response = self.api.list_namespaced_custom_object(
                    *self.where,
                    watch=True,
                    resource_version=self._version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=3600,
                    _preload_content=False,
                )
                self.connected.set()
                lines = 0
                for line in iter_resp_lines(self._response):
                    if line:
                        self._lines.put((time.monotonic(), line))
                        lines += 1
                if not self._stopping.is_set():
                    self.errors.append(f"the server closed the watch after {lines} events")
            except Exception as exc:
                if self._stopping.is_set():
                    break
                self.errors.append(repr(exc))
                time.sleep(0.5)
            if not self._stopping.is_set():
                self.reconnects += 1  # from the last parsed version: replays are harmless
        self._lines.put(None)

    def _parse(self) -> None:
        while (item := self._lines.get()) is not None:
            now, line = item
            try:
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":  # 410 Gone: the next connect lists afresh
                    self.errors.append(str(obj.get("message")))
                    self._version = self._list_version()
                    continue
                self._version = obj["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    self.events += 1
                    self.on_event(event["type"], obj, now)
            except Exception as exc:
                self.errors.append(repr(exc))

    def stop(self) -> None:
        """Closes the watch; returns once every line received has been parsed."""
        self._stopping.set()
        if self._response is not None:
            with suppress(Exception):
                self._response.shutdown()
            with suppress(Exception):
                self._response.release_conn()
        if self.is_alive():
            self.join(10)
        if self._parser.is_alive():
            self._parser.join(60)
        with suppress(Exception):
            self.client.close()


class ClientTimeline:
    """What the two watches saw: each Workflow's ADDED events, each job's first phase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.workflow_uids: dict[str, set[str]] = {}  # per Workflow name: uids seen ADDED
        self.workflow_at: dict[str, float] = {}  # per job: first ADDED of a Workflow it owns
        self.phase_at: dict[str, float] = {}  # per job: first event showing status.phase
        self.first_phase: dict[str, str] = {}

    def on_workflow(self, etype: str, obj: dict[str, Any], now: float) -> None:
        if etype != "ADDED":
            return
        job = _owner_job(obj)
        meta = obj["metadata"]
        with self.lock:
            self.workflow_uids.setdefault(meta["name"], set()).add(meta["uid"])
            if job is not None:
                self.workflow_at.setdefault(job, now)

    def on_job(self, etype: str, obj: dict[str, Any], now: float) -> None:
        phase = (obj.get("status") or {}).get("phase")
        if etype == "DELETED" or not phase:
            return
        name = obj["metadata"]["name"]
        with self.lock:
            if name not in self.phase_at:
                self.phase_at[name] = now
                self.first_phase[name] = phase

    def done(self, jobs: Iterable[str]) -> int:
        with self.lock:
            return sum(1 for n in jobs if n in self.workflow_at and n in self.phase_at)


def _owner_job(workflow: dict[str, Any]) -> str | None:
    """The PSFTJob owning a Workflow (its ownerReference), if any."""
    for ref in workflow["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "PSFTJob" and str(ref.get("apiVersion", "")).startswith(GROUP):
            return ref.get("name")
    return None


def _reconcile_figures(pid: int) -> dict[str, Any]:
    """From the operator's own /metrics (its port read from its command line): how many
    handler runs per result (ok, retry, error) and their mean duration."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    # the last one wins (the chart's args carry one, and Platform appends a free port)
    port = [a.split("=", 1)[1] for a in argv if a.startswith("--metrics-port=")][-1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    results: dict[str, int] = {}
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "psft_reconcile_total":
                results[sample.labels["result"]] = int(sample.value)
            elif sample.name == "psft_reconcile_seconds_sum":
                total = sample.value
            elif sample.name == "psft_reconcile_seconds_count":
                count = sample.value
    return {
        "operator_handler_runs": {k: v for k, v in results.items() if v},
        "operator_handler_mean_s": round(total / count, 3) if count else None,
    }


def _logged_creates(log: str, wall_minus_monotonic: float) -> dict[str, float]:
    """{job: time.monotonic()} of each "created Workflow psft-<job>" line of the operator's
    log (its local-time stamps, to the millisecond): when the create call returned there."""
    created: dict[str, float] = {}
    for line in log.splitlines():
        if match := CREATED_LINE.match(line):
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            job = match[2].removeprefix(WORKFLOW_PREFIX)
            created.setdefault(job, stamp - wall_minus_monotonic)
    return created


def run_real(
    jobs: int,
    concurrency: int,
    timeout: float,
    namespace: str | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from servers.cluster.control_plane import ControlPlane
    from servers.cluster.platform import Platform

    folder = workdir or Path(tempfile.mkdtemp(prefix="psft-operator-load-"))
    plane = ControlPlane(folder)
    platform: Platform | None = None
    watches: list[Watch] = []
    try:
        t_setup = time.monotonic()
        plane.start()
        platform = Platform(plane, **({"job_namespaces": (namespace,)} if namespace else {}))
        ns = platform.job_namespaces[0]  # the chart creates psft-workflow there
        platform.install()  # helm install, kwok nodes, Argo, KubeRay, then the operator
        assert platform.operator is not None
        operator_pid = platform.operator.popen.pid
        setup_seconds = time.monotonic() - t_setup
        print(f"cluster and operator ready in {setup_seconds:.0f} s ({folder})", flush=True)
        sampler = OperatorSampler(operator_pid)

        timeline = ClientTimeline()
        watches = [
            Watch(plane.kubeconfig, ARGO, "v1alpha1", ns, WORKFLOWS, timeline.on_workflow),
            Watch(plane.kubeconfig, GROUP, VERSION, ns, JOBS, timeline.on_job),
        ]
        for watch in watches:
            watch.start()
        for watch in watches:
            if not watch.connected.wait(30):
                raise RuntimeError(f"{watch.name} did not connect: {watch.errors}")

        client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
        client.configuration.connection_pool_maxsize = concurrency
        api = kubernetes.client.CustomObjectsApi(client)
        # one job first: the operator answers /healthz before kopf's watches are live (right
        # after helm install the API server can still refuse watches of the new CRD with 429
        # while its cache initialises, and kopf retries), so the first job measures the start
        warmup_at = time.monotonic()
        api.create_namespaced_custom_object(GROUP, VERSION, ns, JOBS, job_manifest(WARMUP))
        while timeline.done([WARMUP]) < 1:
            if time.monotonic() > warmup_at + 120:
                raise RuntimeError(f"the warm-up job got no Workflow:\n{platform.operator.tail()}")
            time.sleep(0.1)
        warmup_seconds = time.monotonic() - warmup_at
        sampler.restart_cpu()  # the jobs' CPU only; RSS idle stays the one before any job
        others = {
            name: proc.popen.pid
            for name, proc in plane.processes.items()
            if name in ("kube-apiserver", "etcd", "workflow-controller", "kube-scheduler", "kwok")
        }
        others_cpu0 = {name: _cpu_seconds(pid) for name, pid in others.items()}
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        cpu0 = time.process_time()
        started, created_in = create_jobs(api, ns, jobs, concurrency)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if platform.operator.popen.poll() is not None:
                raise RuntimeError(f"the operator exited:\n{platform.operator.tail()}")
            sampler.sample()
            if timeline.done(started) >= jobs:
                break
            time.sleep(0.25)
        all_done_in = time.monotonic() - t0
        time.sleep(5)  # let late duplicates (if any) show up
        operator_figures = sampler.figures(jobs)
        try:
            operator_figures |= _reconcile_figures(operator_pid)
        except Exception as exc:  # diagnostics only
            operator_figures["operator_metrics_error"] = repr(exc)
        others_cpu = {name: _cpu_seconds(pid) - others_cpu0[name] for name, pid in others.items()}
        client_cpu = time.process_time() - cpu0
        load = os.getloadavg()[0]

        workflows = api.list_namespaced_custom_object(ARGO, "v1alpha1", ns, WORKFLOWS)["items"]
        per_job = Counter(_owner_job(w) for w in workflows)
        listed_jobs = api.list_namespaced_custom_object(GROUP, VERSION, ns, JOBS)["items"]
        phases = Counter(
            (j.get("status") or {}).get("phase") or "-"
            for j in listed_jobs
            if j["metadata"]["name"] in started
        )
        client.close()
        operator_log = platform.operator_log()
        wall_minus_monotonic = time.time() - time.monotonic()
    finally:
        for watch in watches:
            watch.stop()
        if platform is not None:
            platform.stop()
        plane.stop()
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)

    watch_errors = [e for watch in watches for e in watch.errors]
    reconnects = {watch.where[3]: watch.reconnects for watch in watches}
    events = {watch.where[3]: watch.events for watch in watches}

    with timeline.lock:
        workflow_at = dict(timeline.workflow_at)
        phase_at = dict(timeline.phase_at)
        workflow_adds = {name: len(uids) for name, uids in timeline.workflow_uids.items()}
        first_phases = Counter(p for n, p in timeline.first_phase.items() if n in started)
    latencies, lost = latency_figures(started, workflow_at, phase_at)
    # the same, as far as the operator's create call (its log): the rest is the API server
    # delivering the Workflow's ADDED event to the watch
    logged = _logged_creates(operator_log, wall_minus_monotonic)
    to_logged = [logged[n] - t for n, t in started.items() if n in logged]
    latencies |= {
        "to_workflow_logged_p50_s": round(_percentile(to_logged, 0.5), 3),
        "to_workflow_logged_p99_s": round(_percentile(to_logged, 0.99), 3),
    }
    lost_listed = [n for n in started if per_job[n] == 0]
    lost = sorted(set(lost) | set(lost_listed))
    duplicate_adds = sum(count - 1 for count in workflow_adds.values())
    extra_workflows = sum(max(0, per_job[n] - 1) for n in started)
    figures = {
        "mode": "real",
        "jobs": jobs,
        "namespace": ns,
        "concurrency": concurrency,
        "setup_seconds": round(setup_seconds, 1),
        "warmup_job_seconds": round(warmup_seconds, 2),
        "create_seconds": round(created_in, 2),
        "all_phased_seconds": round(all_done_in, 2),
        **latencies,
        **operator_figures,
        **{f"{name}_cpu_s": round(cpu, 1) for name, cpu in others_cpu.items()},
        "client_cpu_s": round(client_cpu, 2),
        "host_load_avg_1m_before": round(load_before, 2),
        "host_load_avg_1m": round(load, 2),
        "duplicate_workflow_adds": duplicate_adds,
        "extra_workflows_listed": extra_workflows,
        "duplicate_workflows": duplicate_adds + extra_workflows,
        "workflows_listed": sum(per_job[n] for n in started),
        "lost_jobs": len(lost),
        "first_phases": dict(first_phases),
        "phases_at_end": dict(phases),
        "watch_events": events,
        "watch_reconnects": reconnects,
        "operator_log_errors": sum(
            1 for line in operator_log.splitlines() if " ERROR " in line or "Traceback" in line
        ),
    }
    if lost:
        figures["lost_examples"] = lost[:5]
    if watch_errors:
        figures["watch_errors"] = watch_errors[:3]
    return figures


def real_targets(figures: dict[str, Any]) -> dict[str, bool]:
    return {
        "p99 create->Workflow <= 2 s": figures["to_workflow_p99_s"] <= 2,
        "no duplicate Workflows": figures["duplicate_workflows"] == 0,
        "no lost jobs": figures["lost_jobs"] == 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16, help="client threads creating jobs")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for all jobs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, help="cProfile the operator's main thread")
    parser.add_argument(
        "--real",
        action="store_true",
        help="a real control plane, the chart installed with helm and the real Argo controller "
        "(tests/servers/cluster), instead of the emulator",
    )
    parser.add_argument(
        "--namespace", help="--real: the job namespace (default: the Platform's first one)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="--real: the cluster's folder (kept, with every component's log under logs/); "
        "default: a new temporary folder",
    )
    args = parser.parse_args()
    if args.real:
        if args.profile:
            parser.error("--profile works in emulator mode only")
        if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
            parser.error(f"--workdir {args.workdir} is not empty")
        figures = run_real(args.jobs, args.concurrency, args.timeout, args.namespace, args.workdir)
        return report(figures, real_targets(figures), args.json)
    if args.namespace or args.workdir:
        parser.error("--namespace and --workdir need --real")
    figures = run(args.jobs, args.concurrency, args.timeout, args.profile)
    return report(figures, emulator_targets(figures), args.json)


if __name__ == "__main__":
    sys.exit(main())
