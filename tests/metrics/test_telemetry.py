"""Telemetry without servers: metrics.jsonl, gauges, /metrics over HTTP, port conflicts."""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
from pathlib import Path

import pytest
from servers.jobs import make_job, make_stage_config

from psft.trainer.telemetry import Telemetry
from psft.workflows import layout


def records(n: int) -> list[dict[str, float | int]]:
    return [
        {
            "step": s,
            "total_steps": n,
            "loss": 1.0 / s,
            "entropy": 2.0 - 0.1 * s,
            "clip_fraction": 0.01 * s,
            "learning_rate": 1e-6,
            "tokens_per_second": 100.0 + s,
        }
        for s in range(1, n + 1)
    ]


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PSFT_METRICS_ADDR", "127.0.0.1")
    job = make_job(storage={"type": "local", "local": {"path": str(tmp_path / "runs")}})
    return make_stage_config(job, metrics_port=0)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_records_go_to_jsonl_and_gauges(config, tmp_path: Path) -> None:
    path = tmp_path / "runs" / "demo" / layout.metrics("train")
    with Telemetry(config, path) as tm:
        assert tm.port and tm.url
        for rec in records(3):
            tm.log(rec)
        body = scrape(tm.url)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all("time" in r for r in lines)
    labels = 'job="demo",namespace="default",stage="train"'
    assert f"psft_train_entropy{{{labels}}} 1.7" in body
    assert f"psft_train_step{{{labels}}} 3.0" in body
    assert f"psft_train_total_steps{{{labels}}} 3.0" in body
    assert "psft_train_time" not in body  # timestamps are not metrics
    assert tm.port is None  # stopped serving on close


def test_eval_records_carry_benchmark_and_k(config, tmp_path: Path) -> None:
    job = config.job
    eval_config = make_stage_config(job, "eval", metrics_port=0)
    with Telemetry(eval_config, tmp_path / "eval.jsonl", publish=False) as tm:
        tm.log({"benchmark": "aime24", "k": 4, "avg_at_k": 0.25, "pass_at_k": 0.5})
        body = scrape(tm.url)
    assert 'psft_eval_accuracy{benchmark="aime24",job="demo",k="4"' in body
    assert "psft_eval_pass_at_k{" in body


def test_port_in_use_warns_and_the_stage_goes_on(config, tmp_path: Path, caplog) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cfg = config.model_copy(update={"metrics_port": taken})
        with caplog.at_level(logging.WARNING), Telemetry(cfg, tmp_path / "m.jsonl") as tm:
            tm.log(records(1)[0])
            assert tm.port is None
    assert "cannot serve /metrics" in caplog.text
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 1


def test_monitoring_disabled_serves_nothing(tmp_path: Path) -> None:
    job = make_job(monitoring={"enabled": False})
    with Telemetry(make_stage_config(job), tmp_path / "m.jsonl", publish=False) as tm:
        tm.log(records(1)[0])
        assert tm.port is None
    assert (tmp_path / "m.jsonl").is_file()


def test_rewind_drops_steps_after_the_resumed_checkpoint(config, tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with Telemetry(config, path, publish=False) as tm:
        for rec in records(5):
            tm.log(rec)
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # torn by kill -9
    with Telemetry(config, path, publish=False) as tm:
        tm.rewind(3)
        tm.log(records(5)[3])
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_rewind_to_zero_drops_the_earlier_attempts_baseline_too(config, tmp_path: Path) -> None:
    """A stage retried before its first checkpoint starts over: its step-0 baseline and
    steps are measured again, so the first attempt's go (a resume from step 3 keeps both)."""
    path = tmp_path / "m.jsonl"
    with Telemetry(config, path, publish=False) as tm:
        tm.log({"step": 0, "val_loss": 1.5})
        for rec in records(2):
            tm.log(rec)
    with Telemetry(config, path, publish=False) as tm:
        tm.rewind(0)
        tm.log({"step": 0, "val_loss": 1.5})
        tm.log(records(1)[0])
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1]
    with Telemetry(config, path, publish=False) as tm:
        tm.rewind(1)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1]


def test_non_finite_values_stay_in_jsonl_only(config, tmp_path: Path) -> None:
    with Telemetry(config, tmp_path / "m.jsonl", publish=False) as tm:
        tm.log({"step": 1, "loss": float("nan"), "entropy": 1.5})
        body = scrape(tm.url)
    assert "psft_train_loss{" not in body
    assert "psft_train_entropy{" in body
    assert "NaN" in (tmp_path / "m.jsonl").read_text()


def test_argo_progress_file_follows_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from psft.trainer.telemetry import report_progress

    progress = tmp_path / "progress"
    monkeypatch.setenv("ARGO_PROGRESS_FILE", str(progress))
    report_progress({"step": 3, "total_steps": 216, "loss": 1.0})
    assert progress.read_text() == "3/216\n"
    report_progress({"benchmark": "aime24", "avg_at_k": 0.1})  # no step: unchanged
    assert progress.read_text() == "3/216\n"
    monkeypatch.delenv("ARGO_PROGRESS_FILE")
    report_progress({"step": 4, "total_steps": 216})
    assert progress.read_text() == "3/216\n"
