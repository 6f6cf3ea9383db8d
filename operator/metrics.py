"""Operator metrics on /metrics (prometheus_client), labels of bounded cardinality.

psft_jobs{phase}                       jobs seen by this operator, per phase
psft_reconcile_total{result}           reconciliations: ok, invalid, retry, error
psft_reconcile_seconds                 time per reconciliation
psft_stage_duration_seconds{stage}     duration of finished stages (once per job and stage)
psft_job_<metric>{namespace,psftjob}   latest training metrics of each job, from its status
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from psft.workflows.status import PHASES

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS = Gauge("psft_jobs", "PSFTJobs by phase", ["phase"], registry=REGISTRY)
RECONCILES = Counter(
    "psft_reconcile", "Reconciliations of PSFTJobs by result", ["result"], registry=REGISTRY
)
RECONCILE_SECONDS = Histogram(
    "psft_reconcile_seconds",
    "Time to reconcile a PSFTJob",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "psft_stage_duration_seconds",
    "Wall time of finished stages",
    ["stage"],
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
    registry=REGISTRY,
)
# status.metrics key -> gauge name suffix
JOB_METRICS = {
    "step": "step",
    "totalSteps": "total_steps",
    "loss": "loss",
    "entropy": "entropy",
    "clipFraction": "clip_fraction",
    "gradNorm": "grad_norm",
    "learningRate": "learning_rate",
    "tokensPerSecond": "tokens_per_second",
    "valLoss": "val_loss",
}
JOB_GAUGES = {
    key: Gauge(
        f"psft_job_{suffix}",
        f"Latest {suffix.replace('_', ' ')} of the job's training stage (from its status)",
        ["namespace", "psftjob"],
        registry=REGISTRY,
    )
    for key, suffix in JOB_METRICS.items()
}
BEST_AVG = Gauge(
    "psft_job_best_avg_at_k",
    "Best Avg@k over the job's evaluated benchmarks",
    ["namespace", "psftjob"],
    registry=REGISTRY,
)

for _phase in PHASES:
    JOBS.labels(_phase).set(0)
for _result in ("ok", "invalid", "retry", "error"):
    RECONCILES.labels(_result)


class JobTracker:
    """Remembers each job's phase and finished stages, so the gauges count each job once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        self._timed: set[tuple[str, str, str]] = set()

    def observe(self, namespace: str, name: str, uid: str, status: Mapping[str, Any]) -> None:
        phase = status.get("phase")
        with self._lock:
            if phase:
                self._phases[(namespace, name)] = phase
            self._refresh_phases()
            for stage, info in (status.get("stages") or {}).items():
                key = (uid, stage, str(info.get("startedAt")))
                seconds = _duration(info.get("startedAt"), info.get("finishedAt"))
                if seconds is not None and key not in self._timed:
                    self._timed.add(key)
                    STAGE_SECONDS.labels(stage).observe(seconds)
        metrics = status.get("metrics") or {}
        for key, gauge in JOB_GAUGES.items():
            if isinstance(metrics.get(key), int | float):
                gauge.labels(namespace, name).set(metrics[key])
        if isinstance(status.get("bestAvgAtK"), int | float):
            BEST_AVG.labels(namespace, name).set(status["bestAvgAtK"])

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)
            self._refresh_phases()
        for gauge in (*JOB_GAUGES.values(), BEST_AVG):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)

    def _refresh_phases(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            JOBS.labels(phase).set(count)


def _duration(started: Any, finished: Any) -> float | None:
    if not (isinstance(started, str) and isinstance(finished, str)):
        return None
    try:
        start = datetime.fromisoformat(started.replace("Z", "+00:00"))
        end = datetime.fromisoformat(finished.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (end - start).total_seconds())


TRACKER = JobTracker()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Start the /metrics HTTP server in a daemon thread (port 0: disabled)."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
