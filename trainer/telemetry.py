"""Stage metrics: one JSON line per record (the durable copy) and Prometheus gauges.

    with Telemetry(config, store.local_path(layout.metrics("train"))) as tm:
        for step in ...:
            tm.log({"step": step, "total_steps": n, "loss": ..., "entropy": ..., ...})

Each record is appended to `metrics.jsonl` and sets the gauges of the stage in a registry
of its own, served on HTTP `/metrics` while the stage runs (port
`monitoring.metricsPort`, or the stage config's `metricsPort`; 0 picks a free one). On
close the final values go to a Pushgateway when `monitoring.pushgateway` is set, since a
short stage may end before Prometheus scrapes it, and `metrics.jsonl` is published to the
run's storage (also every `push_interval_s` while running). Metric problems (a port in
use, an unreachable Pushgateway, storage hiccups while running) are warnings: they never
stop a training.

Labels are namespace, job and stage only (eval adds benchmark and k): never values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, start_http_server

from psft.workflows.errors import UserError
from psft.workflows.stages import StageConfig

log = logging.getLogger("psft.telemetry")

BASE_LABELS = ("namespace", "job", "stage")
EVAL_LABELS = (*BASE_LABELS, "benchmark", "k")

TRAIN_METRICS: dict[str, str] = {
    "entropy": "Token-mean entropy of the policy over response tokens (before the update)",
    "loss": "Training loss of the step (token-mean)",
    "clip_fraction": "Share of response tokens whose gradient the ratio clip removes",
    "ratio_mean": "Mean probability ratio new/old over response tokens",
    "ratio_max": "Largest probability ratio new/old in the step",
    "approx_kl": "Approximate KL(old || new) of the step",
    "grad_norm": "Global gradient norm before clipping",
    "learning_rate": "Learning rate of the step",
    "step": "Last completed training step",
    "total_steps": "Training steps planned for the stage",
    "epoch": "Current epoch",
    "tokens_per_second": "Training throughput in tokens per second",
    "tokens": "Response tokens trained on so far",
    "val_loss": "Held-out loss at the last evaluation step",
    "val_entropy": "Held-out token entropy at the last evaluation step",
}
"""Keys of train/grpo records exported as `psft_train_<key>`; other numeric keys are
exported too (e.g. GRPO rewards), under the same prefix."""

EVAL_METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("psft_eval_accuracy", "Avg@k: mean accuracy over k samples per problem"),
    "avg_at_k": ("psft_eval_accuracy", "Avg@k: mean accuracy over k samples per problem"),
    "pass_at_k": ("psft_eval_pass_at_k", "pass@k: share of problems solved by any sample"),
    "maj_at_k": ("psft_eval_maj_at_k", "maj@k: accuracy of the majority answer"),
}

NOT_METRICS = {"time", "elapsed_s", "checkpoint", "benchmark", "k", "samples"}
_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _ranges(steps: list[int]) -> str:
    """`1-3, 7` for [1, 2, 3, 7]."""
    out: list[str] = []
    start = prev = steps[0]
    for s in [*steps[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}-{prev}" if prev > start else str(start))
        if s is not None:
            start = prev = s
    return ", ".join(out)


def metrics_bind_address() -> str:
    """All interfaces in a pod (Prometheus scrapes the pod IP), loopback elsewhere."""
    explicit = os.environ.get("PSFT_METRICS_ADDR")
    if explicit:
        return explicit
    return "0.0.0.0" if os.environ.get("KUBERNETES_SERVICE_HOST") else "127.0.0.1"


def report_progress(record: dict[str, Any]) -> None:
    """Write Argo's progress file ("step/total") when running in an Argo pod.

    Argo reads $ARGO_PROGRESS_FILE periodically; the operator mirrors it into
    PSFTJob.status. Outside Argo the variable is unset and nothing is written.
    """
    path = os.environ.get("ARGO_PROGRESS_FILE")
    step, total = record.get("step"), record.get("total_steps")
    if not path or not isinstance(step, int) or not isinstance(total, int) or total <= 0:
        return
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{min(step, total)}/{total}\n")
        os.replace(tmp, path)
    except OSError as exc:  # progress is informative; never fail the stage for it
        log.warning("cannot write progress file %s: %s", path, exc)


class Telemetry:
    """Metrics of one stage process: metrics.jsonl + Prometheus gauges."""

    def __init__(
        self,
        config: StageConfig,
        jsonl_path: Path,
        *,
        store: Any | None = None,
        publish: bool = True,
        push_interval_s: float = 60.0,
    ) -> None:
        self.config = config
        self.jsonl_path = Path(jsonl_path)
        self.push_interval_s = push_interval_s
        monitoring = config.job.spec.monitoring
        self.enabled = monitoring.enabled
        self.pushgateway = monitoring.pushgateway
        port = config.metrics_port if config.metrics_port is not None else monitoring.metrics_port
        self.requested_port = port
        self.port: int | None = None
        """Port of the /metrics endpoint while it is served, else None."""
        self.labels = {
            "namespace": config.job.metadata.namespace,
            "job": config.job.metadata.name,
            "stage": config.stage,
        }
        self.registry = CollectorRegistry(auto_describe=True)
        self._gauges: dict[str, Gauge] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._store = store
        self._publish = publish
        self._last_push = time.monotonic()
        self._records = 0

    # life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> Telemetry:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(publish_errors=exc is None)

    def open(self) -> None:
        if self._publish and self._store is None:
            from psft.trainer.storage import open_run_store

            self._store = open_run_store(self.config)
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._resume_jsonl()
        if self.enabled:
            self._serve()

    def close(self, *, publish_errors: bool = True) -> None:
        """Push final values, stop serving, publish metrics.jsonl (a failure to publish
        raises unless the stage is already failing)."""
        if self.enabled and self.pushgateway and self._records:
            self._push_gateway()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self.port = None
        self._publish_jsonl(final=publish_errors)

    @property
    def url(self) -> str | None:
        """http://host:port/metrics while served."""
        if self.port is None:
            return None
        host = metrics_bind_address()
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}/metrics"

    # records --------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and update the stage's gauges."""
        record = {**record}
        record.setdefault("time", round(time.time(), 3))
        line = json.dumps(record, allow_nan=True) + "\n"
        with self._lock:
            with self.jsonl_path.open("a") as f:
                f.write(line)
            self._records += 1
            if self.enabled:
                self._update_gauges(record)
        report_progress(record)
        if (
            self._at_checkpoint(record)
            or time.monotonic() - self._last_push >= self.push_interval_s
        ):
            self._publish_jsonl(final=False)

    def _at_checkpoint(self, record: dict[str, Any]) -> bool:
        """Whether the stage saves a checkpoint at this record's step: the durable record
        is published then too, so a restarted stage elsewhere finds the steps it keeps."""
        step, every = record.get("step"), self.config.job.spec.psft.save_every
        if self.config.kind != "train" or not isinstance(step, int):
            return False
        return (every > 0 and step % every == 0) or step == record.get("total_steps")

    def rewind(self, step: int) -> None:
        """Drop records after `step` (a stage resuming from checkpoint `step` repeats the
        steps after it; their first attempt would otherwise appear twice). From step 0 the
        earlier attempt's step-0 baseline goes too: the new attempt measures it again."""
        if not self.jsonl_path.is_file():
            if step > 0:
                log.warning(
                    "metrics: %s is missing; steps 1-%d have no records", self.jsonl_path, step
                )
            return
        kept: list[str] = []
        seen: set[int] = set()
        fix = (
            "repair the line, or move the file aside (the stage then goes on without the "
            "earlier records)"
        )
        for n, raw in enumerate(self.jsonl_path.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8")  # records are ASCII: a torn one is still UTF-8
            except UnicodeDecodeError:
                raise UserError(
                    f"{self.jsonl_path}: line {n} is not UTF-8 text, so not a record psft "
                    f"wrote; {fix}"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue  # a line torn by a kill -9 mid-write
            if not isinstance(record, dict):
                raise UserError(
                    f"{self.jsonl_path}: line {n} is not a JSON object, so not a record psft "
                    f"wrote; {fix}"
                )
            rec_step = record.get("step")
            if not isinstance(rec_step, int) or rec_step < step or rec_step == step > 0:
                kept.append(line)
                if isinstance(rec_step, int):
                    seen.add(rec_step)
        with self._lock:
            self.jsonl_path.write_text("".join(f"{line}\n" for line in kept))
        missing = sorted(set(range(1, step + 1)) - seen)
        if missing:
            log.warning(
                "metrics: %s has no records for steps %s (lost with the interrupted attempt); "
                "training resumes from step %d regardless",
                self.jsonl_path.name,
                _ranges(missing),
                step,
            )

    def _update_gauges(self, record: dict[str, Any]) -> None:
        if "benchmark" in record:
            labels = {
                **self.labels,
                "benchmark": str(record["benchmark"]),
                "k": str(record.get("k", record.get("samples", ""))),
            }
            for key, (name, doc) in EVAL_METRICS.items():
                value = _number(record.get(key))
                if value is not None:
                    self._gauge(name, doc, EVAL_LABELS).labels(**labels).set(value)
            return
        prefix = (
            "psft_train_"
            if self.config.kind in ("train", "grpo")
            else f"psft_{_NAME.sub('_', self.config.kind)}_"
        )
        for key, raw in record.items():
            value = _number(raw)
            if value is None or key in NOT_METRICS:
                continue
            name = prefix + _NAME.sub("_", key)
            doc = TRAIN_METRICS.get(key, f"{key} as logged in metrics.jsonl")
            self._gauge(name, doc, BASE_LABELS).labels(**self.labels).set(value)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        gauge = self._gauges.get(name)
        if gauge is None:
            gauge = Gauge(name, doc, labels, registry=self.registry)
            self._gauges[name] = gauge
        return gauge

    # outputs ----------------------------------------------------------------------------------
    def _serve(self) -> None:
        addr = metrics_bind_address()
        try:
            server, _thread = start_http_server(
                self.requested_port, addr=addr, registry=self.registry
            )
        except OSError as exc:
            log.warning(
                "metrics: cannot serve /metrics on %s:%s (%s); the stage goes on without it "
                "(set monitoring.metricsPort to a free port, or 0 for any)",
                addr,
                self.requested_port,
                exc,
            )
            return
        self._server = server
        self.port = int(server.server_port)
        log.info("metrics: serving %s", self.url)

    def _push_gateway(self) -> None:
        assert self.pushgateway is not None
        try:
            push_to_gateway(
                self.pushgateway,
                job=self.labels["job"],
                grouping_key={"namespace": self.labels["namespace"], "stage": self.labels["stage"]},
                registry=self.registry,
                timeout=10,
            )
        except Exception as exc:  # metrics never stop a stage
            log.warning("metrics: push to Pushgateway %s failed: %s", self.pushgateway, exc)

    def _store_key(self) -> str | None:
        if self._store is None:
            return None
        try:
            return str(self.jsonl_path.resolve().relative_to(Path(self._store.work_dir).resolve()))
        except ValueError:
            return None

    def _resume_jsonl(self) -> None:
        """A stage restarted on a fresh machine continues the published record."""
        key = self._store_key()
        if key is None or self.jsonl_path.exists():
            return
        if self._store.exists(key):
            self._store.pull(key)

    def _publish_jsonl(self, *, final: bool) -> None:
        self._last_push = time.monotonic()
        key = self._store_key()
        if not self._publish or key is None or not self.jsonl_path.is_file():
            return
        try:
            self._store.push(key)
        except Exception as exc:
            if final:
                raise
            log.warning(
                "metrics: publishing %s failed (retried at the next interval): %s", key, exc
            )
