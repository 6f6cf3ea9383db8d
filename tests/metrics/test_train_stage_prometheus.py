"""A real training (`psft train` on the tiny model) scraped by a real Prometheus while it
runs, its final values pushed to a real Pushgateway: what Prometheus stored equals the
stage's metrics.jsonl."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from servers.jobs import make_job, make_stage_config
from servers.prometheus import PrometheusStack
from servers.seaweed import free_ports

from psft.trainer.prepare import run as run_prepare
from psft.workflows import layout

pytestmark = pytest.mark.integration

ROWS = [
    {
        "prompt": [{"role": "user", "content": f"What is {i} times 7?"}],
        "demonstration": f"{i} times 7 is {7 * i}, so the answer is \\boxed{{{7 * i}}}.",
    }
    for i in range(24)
]


def test_training_scraped_by_prometheus_matches_metrics_jsonl(
    prometheus_stack: PrometheusStack, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("PSFT_METRICS_ADDR", "127.0.0.1")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    runs = tmp_path / "runs"
    # Prometheus knows the endpoint before the stage starts: a quick run (seconds on an idle
    # machine) must not end before service discovery has picked up its target
    [port] = free_ports(1)
    prometheus_stack.add_target(f"127.0.0.1:{port}")
    wait_until_known(prometheus_stack, f"127.0.0.1:{port}")
    job = make_job(
        "prom-train",
        storage={"type": "local", "local": {"path": str(runs)}},
        model={"source": str(tiny_model_dir)},
        # token budgets within the tiny model's context: the stage config is validated
        dataset={
            "train": [str(data)],
            "systemPrompt": "",
            "maxPromptLength": 512,
            "maxResponseLength": 1024,
        },
        # 8 updates a step keep the stage serving for several 1 s scrapes on an idle machine
        psft={
            "batchSize": 8,
            "miniBatchSize": 1,
            "microBatchSize": 1,
            "maxSteps": 40,
            "epochs": 14,
        },
        resources={"device": "cpu"},
        monitoring={"metricsPort": port, "pushgateway": prometheus_stack.pushgateway_url},
    )
    run_prepare(make_stage_config(job, "prepare"))
    config = make_stage_config(job, "train").model_copy(update={"progress": False})
    stage_json = tmp_path / "train.json"
    stage_json.write_text(config.dump())

    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "psft.workflows.cli", "train", "--config", str(stage_json)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    target: list[str] = []

    def follow() -> None:  # add the stage's endpoint to Prometheus as soon as it is printed
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            found = re.search(r"metrics: http://(127\.0\.0\.1:\d+)/metrics", line)
            if found and not target:
                target.append(found.group(1))

    reader = threading.Thread(target=follow)
    reader.start()
    try:
        assert proc.wait(timeout=300) == 0, "".join(output)[-3000:]
    finally:
        reader.join(timeout=30)
        prometheus_stack.remove_target(f"127.0.0.1:{port}")
    assert target == [f"127.0.0.1:{port}"], "no endpoint printed: " + "".join(output)[-2000:]

    lines = (runs / "prom-train" / layout.metrics("train")).read_text().splitlines()
    records = {r["step"]: r for r in map(json.loads, lines)}
    assert sorted(records) == list(range(1, 41))
    sel = '{namespace="default",job="prom-train",stage="train"}'

    # final values: pushed on close, scraped from the Pushgateway
    last = records[40]
    assert prometheus_stack.wait_for(f"psft_train_step{sel}", 40) == 40
    assert prometheus_stack.wait_for(f"psft_train_entropy{sel}") == pytest.approx(last["entropy"])
    assert prometheus_stack.wait_for(f"psft_train_loss{sel}") == pytest.approx(last["loss"])

    # while it ran: every scrape of the stage's own endpoint shows the record of its step
    window = {"start": started - 1, "end": time.time() + 1, "step": "0.25"}
    live = f'instance="{target[0]}"'
    steps = prometheus_stack.api("query_range", query=f"psft_train_step{{{live}}}", **window)
    entropy = prometheus_stack.api("query_range", query=f"psft_train_entropy{{{live}}}", **window)
    assert steps["result"], "Prometheus never scraped the running stage"
    by_time = {t: float(v) for t, v in entropy["result"][0]["values"]}
    checked = 0
    for t, step in steps["result"][0]["values"]:
        if t in by_time:
            assert by_time[t] == pytest.approx(records[int(float(step))]["entropy"], rel=1e-12)
            checked += 1
    assert checked > 0


def wait_until_known(stack: PrometheusStack, host_port: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = stack.api("targets")["activeTargets"]
        if any(t["labels"].get("instance") == host_port for t in active):
            return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus did not discover {host_port} within {timeout} s")
