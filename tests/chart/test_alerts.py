"""The PrometheusRule alerts, evaluated by Prometheus' own rule engine (promtool).

`promtool test rules` replays synthetic series through the rendered expressions, so the
alerts are checked for firing (and for staying quiet) exactly as Prometheus would.
promtool comes with Debian's `prometheus` package (apt-get install prometheus).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import Render, one

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)

SERIES = [
    # job "collapsing": entropy falls from 1.0 to 0.15 (< 0.2 x start) at minute 5
    {
        "series": 'psft_train_entropy{namespace="ml", job="collapsing", stage="train", pod="p1"}',
        "values": "1 1 1 0.9 0.5 0.15x40",
    },
    # the same job's SFT baseline arm (spec.compare) collapses too: expected, no alert
    {
        "series": 'psft_train_entropy{namespace="ml", job="collapsing", stage="train-sft", '
        'pod="p5"}',
        "values": "1 1 0.5 0.1x42",
    },
    # job "healthy": entropy stays at 0.9 of its start
    {
        "series": 'psft_train_entropy{namespace="ml", job="healthy", stage="train", pod="p2"}',
        "values": "1 0.9x45",
    },
    # job "hung": 10 steps, then nothing for the rest of the hour
    {
        "series": 'psft_train_step{namespace="ml", job="hung", stage="train", pod="p3"}',
        "values": "0+1x10 10x50",
    },
    {
        "series": 'psft_train_total_steps{namespace="ml", job="hung", stage="train", pod="p3"}',
        "values": "100x60",
    },
    # job "done": reached its last step at minute 10 and stays there: not stuck
    {
        "series": 'psft_train_step{namespace="ml", job="done", stage="train", pod="p4"}',
        "values": "0+10x10 100x50",
    },
    {
        "series": 'psft_train_total_steps{namespace="ml", job="done", stage="train", pod="p4"}',
        "values": "100x60",
    },
    # operator (2 replicas, scraped in its namespace): one job fails at minute 5
    {
        "series": 'psft_jobs{namespace="psft-system", pod="op-1", phase="Failed"}',
        "values": "0x4 1x20",
    },
    {"series": 'psft_jobs{namespace="psft-system", pod="op-2", phase="Failed"}', "values": "0x25"},
    {"series": 'psft_jobs{namespace="psft-system", pod="op-1", phase="Running"}', "values": "3x25"},
]


def _alert(
    name: str, at: str, expected: list[tuple[dict[str, str], dict[str, str]]]
) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [{"exp_labels": lab, "exp_annotations": ann} for lab, ann in expected],
    }


def _rule_files(helm_template: Render, tmp_path: Path) -> Path:
    rule = one(helm_template({"alerts": {"enabled": True}}), "PrometheusRule")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return rules


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_rules_are_valid_promql(helm_template: Render, tmp_path: Path) -> None:
    proc = _promtool("check", "rules", str(_rule_files(helm_template, tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_fire_on_collapse_stall_and_failure_only(
    helm_template: Render, tmp_path: Path
) -> None:
    rules = _rule_files(helm_template, tmp_path)
    collapse = (
        {"namespace": "ml", "job": "collapsing", "stage": "train", "severity": "warning"},
        {
            "summary": "Entropy of PSFTJob ml/collapsing collapsed in stage train",
            "description": "Token entropy of stage train is 0.150, below 0.2 of its starting "
            "(highest) value for 10m. The policy is turning deterministic, which usually "
            "costs out-of-domain generalisation: lower the learning rate or "
            "psft.clipRatioHigh, or stop at an earlier checkpoint.",
        },
    )
    stuck = (
        {"namespace": "ml", "job": "hung", "stage": "train", "severity": "warning"},
        {
            "summary": "PSFTJob ml/hung makes no progress",
            "description": "Stage train has stayed at step 10 for more than 30m without "
            "reaching its last step. Check the pod's logs (kubectl logs -n ml -l "
            "psft.dev/job=hung) for a hang in data loading, NCCL or storage.",
        },
    )
    failed = (
        {"severity": "critical"},
        {
            "summary": "1 PSFTJob(s) in phase Failed",
            "description": "kubectl get psftjobs -A shows which; kubectl describe psftjob -n "
            "NAMESPACE NAME gives the failed stage and its message. The alert clears when the "
            "failed jobs are deleted or restarted.",
        },
    )
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": SERIES,
                "alert_rule_test": [
                    # below the threshold since minute 5, `for: 10m`: pending, then firing
                    _alert("PSFTEntropyCollapse", "10m", []),
                    _alert("PSFTEntropyCollapse", "20m", [collapse]),
                    # no step since minute 10: 30m window + `for: 5m`
                    _alert("PSFTJobStuck", "30m", []),
                    _alert("PSFTJobStuck", "50m", [stuck]),
                    _alert("PSFTJobFailed", "3m", []),
                    _alert("PSFTJobFailed", "10m", [failed]),
                ],
            }
        ],
    }
    test_file = tmp_path / "tests.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    proc = _promtool("test", "rules", str(test_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
