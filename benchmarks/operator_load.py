"""Load test of the operator: N PSFTJobs created at once against the Kubernetes API emulator.

The emulator (tests/operator/kube_emulator.py) runs in this process and timestamps, on the
server side, when each job's Workflow is created and when each job first shows phase
Pending; the operator runs as a separate `psft operator` process whose memory is sampled
from /proc. Prints p50/p99 latencies, the operator's peak RSS, duplicate Workflows, lost
jobs and API calls per job.

    .venv/bin/python benchmarks/operator_load.py --jobs 500

Targets (issue 5): p99 create->Workflow <= 5 s, RSS <= 250 MB, no duplicates, no lost jobs.
"""

from __future__ import annotations

import argparse
import json
import os
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

import kubernetes  # noqa: E402
from kube_emulator import EmulatorThread, Key, KubeEmulator, Obj  # noqa: E402
from operator_harness import job_manifest  # noqa: E402

NS = "bench"


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
        peak_sampled = 0.0
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
            idle_rss, _ = _rss_mb(operator.pid)
            idle_cpu = _cpu_seconds(operator.pid)

            client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
            client.configuration.connection_pool_maxsize = concurrency
            api = kubernetes.client.CustomObjectsApi(client)
            started: dict[str, float] = {}
            lock = threading.Lock()

            def create(i: int) -> None:
                name = f"load-{i:04d}"
                manifest = job_manifest(name)
                with lock:
                    started[name] = time.monotonic()
                api.create_namespaced_custom_object(
                    "psft.dev", "v1alpha1", NS, "psftjobs", manifest
                )

            t0 = time.monotonic()
            cpu0 = time.process_time()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(create, range(jobs)))
            created_in = time.monotonic() - t0

            assert emu.emulator is not None
            timed: TimedEmulator = emu.emulator  # type: ignore[assignment]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = emu.call(lambda: len(timed.pending_at))
                _, hwm = _rss_mb(operator.pid)
                peak_sampled = max(peak_sampled, hwm)
                if done >= jobs:
                    break
                time.sleep(0.25)
            time.sleep(2)  # let late duplicates (if any) show up
            all_done_in = time.monotonic() - t0
            final_rss, peak_rss = _rss_mb(operator.pid)
            busy_cpu = _cpu_seconds(operator.pid) - idle_cpu
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

    to_workflow = [
        workflow_added[f"psft-{n}"] - t for n, t in started.items() if f"psft-{n}" in workflow_added
    ]
    to_pending = [pending_at[n] - t for n, t in started.items() if n in pending_at]
    lost = sorted(n for n in started if f"psft-{n}" not in workflow_added or n not in pending_at)
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
        "to_workflow_p50_s": round(_percentile(to_workflow, 0.5), 3),
        "to_workflow_p99_s": round(_percentile(to_workflow, 0.99), 3),
        "to_workflow_max_s": round(max(to_workflow, default=float("nan")), 3),
        "to_pending_p50_s": round(_percentile(to_pending, 0.5), 3),
        "to_pending_p99_s": round(_percentile(to_pending, 0.99), 3),
        "operator_rss_idle_mb": round(idle_rss, 1),
        "operator_rss_final_mb": round(final_rss, 1),
        "operator_rss_peak_mb": round(max(peak_rss, peak_sampled), 1),
        "operator_cpu_s": round(busy_cpu, 2),
        "operator_cpu_ms_per_job": round(1000 * busy_cpu / jobs, 1),
        "emulator_and_client_cpu_s": round(emulator_cpu, 2),
        "host_load_avg_1m": round(load, 2),
        "duplicate_workflows": duplicates,
        "lost_jobs": len(lost),
        "status_writes_per_job": round(status_writes / jobs, 2),
        "operator_api_calls_per_job": round(operator_calls / jobs, 2),
        "mean_to_workflow_s": round(statistics.fmean(to_workflow), 3) if to_workflow else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16, help="client threads creating jobs")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for all jobs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, help="cProfile the operator's main thread")
    args = parser.parse_args()
    figures = run(args.jobs, args.concurrency, args.timeout, args.profile)
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    targets = {
        "p99 create->Workflow <= 5 s": figures["to_workflow_p99_s"] <= 5,
        "operator RSS <= 250 MB": figures["operator_rss_peak_mb"] <= 250,
        "no duplicate Workflows": figures["duplicate_workflows"] == 0,
        "no lost jobs": figures["lost_jobs"] == 0,
    }
    for target, met in targets.items():
        print(f"{'PASS' if met else 'MISS'}  {target}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
