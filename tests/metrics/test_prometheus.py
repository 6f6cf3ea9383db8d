"""A real Prometheus scrapes a stage's /metrics; a short stage's values arrive through a
real Pushgateway. What Prometheus stored is compared with metrics.jsonl."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from servers.jobs import make_job, make_stage_config
from servers.prometheus import PrometheusStack

from psft.trainer.telemetry import Telemetry
from psft.workflows import layout

pytestmark = pytest.mark.integration


def training_records(n: int) -> list[dict[str, float | int]]:
    """Records shaped like the train stage's, with distinct values per step."""
    out = []
    for s in range(1, n + 1):
        out.append(
            {
                "step": s,
                "total_steps": n,
                "epoch": 0,
                "loss": round(-1.0 + 0.01 * s, 6),
                "entropy": round(1.9 - 0.07 * s, 6),
                "clip_fraction": round(0.002 * s, 6),
                "ratio_mean": 1.0,
                "approx_kl": round(1e-4 * s, 8),
                "grad_norm": round(0.5 + 0.1 * s, 6),
                "learning_rate": 1e-6,
                "tokens_per_second": 1000.0 + s,
            }
        )
    return out


@pytest.fixture
def job_config(prometheus_stack: PrometheusStack, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PSFT_METRICS_ADDR", "127.0.0.1")

    def make(name: str, stage: str):
        job = make_job(
            name,
            storage={"type": "local", "local": {"path": str(tmp_path / "runs")}},
            monitoring={"pushgateway": prometheus_stack.pushgateway_url},
        )
        return make_stage_config(job, stage, metrics_port=0)

    return make


def test_scraped_entropy_matches_metrics_jsonl(prometheus_stack, job_config, tmp_path) -> None:
    config = job_config("scrape-demo", "train")
    path = tmp_path / "runs" / "scrape-demo" / layout.metrics("train")
    sel = '{namespace="default",job="scrape-demo",stage="train"}'
    scraped: dict[int, float] = {}
    start = time.time()
    with Telemetry(config, path) as tm:
        target = f"127.0.0.1:{tm.port}"
        prometheus_stack.add_target(target)
        try:
            for rec in training_records(4):
                tm.log(rec)
                prometheus_stack.wait_for(f"psft_train_step{sel}", rec["step"], timeout=30)
                scraped[rec["step"]] = prometheus_stack.wait_for(f"psft_train_entropy{sel}")
        finally:
            prometheus_stack.remove_target(target)
    logged = {r["step"]: r["entropy"] for r in map(json.loads, path.read_text().splitlines())}
    assert scraped == logged

    # the stored series holds exactly the logged values, in order
    live = sel.replace("}", f',instance="{target}"}}')  # not the copy pushed on close
    series = prometheus_stack.api(
        "query_range",
        query=f"psft_train_entropy{live}",
        start=start - 1,
        end=time.time() + 1,
        step="0.5",
    )["result"]
    assert len(series) == 1
    assert series[0]["metric"]["job"] == "scrape-demo"  # our label, not the scrape job's
    values = [float(v) for _, v in series[0]["values"]]
    distinct = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    assert distinct == [logged[s] for s in sorted(logged)]


def test_short_stage_reaches_prometheus_through_the_pushgateway(
    prometheus_stack, job_config, tmp_path
) -> None:
    config = job_config("push-demo", "eval")
    with Telemetry(config, tmp_path / "eval.jsonl") as tm:  # ends before any scrape
        tm.log({"benchmark": "aime24", "k": 4, "checkpoint": "final", "avg_at_k": 0.25})
        tm.log({"benchmark": "amc23", "k": 4, "checkpoint": "final", "avg_at_k": 0.5})
    with urllib.request.urlopen(f"{prometheus_stack.pushgateway_url}/metrics") as resp:
        pushed = resp.read().decode()
    assert 'psft_eval_accuracy{benchmark="aime24",instance="",job="push-demo"' in pushed
    sel = 'job="push-demo",namespace="default",stage="eval",k="4"'
    for bench, want in (("aime24", 0.25), ("amc23", 0.5)):
        got = prometheus_stack.wait_for(f'psft_eval_accuracy{{{sel},benchmark="{bench}"}}')
        assert got == want
