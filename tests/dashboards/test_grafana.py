"""The Grafana dashboards: generated from the panel definitions, committed, consistent."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from psft.trainer.telemetry import TRAIN_METRICS
from psft.workflows.dashboards.__main__ import main as generate
from psft.workflows.dashboards.grafana import build_dashboard, dashboard_files
from psft.workflows.dashboards.panels import (
    DASHBOARDS,
    OPERATOR_DASHBOARD,
    TRAINING_DASHBOARD,
    all_panels,
)

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "charts" / "psft" / "dashboards"


def test_committed_json_is_what_the_code_generates(tmp_path: Path) -> None:
    assert generate(["--check", "--out", str(COMMITTED)]) == 0, (
        "charts/psft/dashboards is stale: run `python -m psft.workflows.dashboards`"
    )
    assert sorted(p.name for p in COMMITTED.glob("*.json")) == sorted(dashboard_files())
    # and --check does notice a difference
    generate(["--out", str(tmp_path)])
    (tmp_path / "psft-training.json").write_text("{}\n")
    assert generate(["--check", "--out", str(tmp_path)]) == 1


def test_generation_is_deterministic() -> None:
    assert dashboard_files() == dashboard_files()


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


@pytest.mark.parametrize("definition", DASHBOARDS, ids=lambda d: d.uid)
def test_layout_ids_and_datasource(definition: Any) -> None:
    board = build_dashboard(definition)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        cell = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & cell, f"panel {p['title']!r} overlaps another"
        cells |= cell
    for p in _panels(board):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"] and p["description"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["namespace"]["multi"] and variables["namespace"]["includeAll"]


def test_training_dashboard_filters_every_query_by_namespace_and_job() -> None:
    board = build_dashboard(TRAINING_DASHBOARD)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert "$namespace" in variables["job"]["query"]
    for p in _panels(board):
        for t in p["targets"]:
            assert '"$namespace"' in t["expr"], t["expr"]
            assert "$job" in t["expr"], t["expr"]


def test_operator_dashboard_selects_the_operator_by_namespace() -> None:
    board = build_dashboard(OPERATOR_DASHBOARD)
    assert "job" not in {v["name"] for v in board["templating"]["list"]}
    for p in _panels(board):
        for t in p["targets"]:
            assert '"$namespace"' in t["expr"], t["expr"]


ISSUE_PANELS = {
    "entropy": "psft_train_entropy",
    "loss": "psft_train_loss",
    "clip_fraction": "psft_train_clip_fraction",
    "ratio_mean": "psft_train_ratio_mean",
    "approx_kl": "psft_train_approx_kl",
    "grad_norm": "psft_train_grad_norm",
    "learning_rate": "psft_train_learning_rate",
    "tokens_per_second": "psft_train_tokens_per_second",
    "progress": "psft_train_total_steps",
    "eta": "psft_train_step",
    "eval_accuracy": "psft_eval_accuracy",
    "grpo_reward": "psft_train_reward",
    "gpu_utilization": "DCGM_FI_DEV_GPU_UTIL",
    "gpu_memory": "DCGM_FI_DEV_FB_USED",
    "jobs_by_phase": "psft_jobs",
    "reconcile_latency": "psft_reconcile_seconds_bucket",
}


def test_every_panel_the_issue_asks_for_queries_its_metric() -> None:
    panels = {p.key: p for d in DASHBOARDS for p in all_panels(d)}
    for key, metric in ISSUE_PANELS.items():
        assert key in panels, f"missing panel {key}"
        assert any(metric in q.expr for q in panels[key].queries), (key, metric)


def test_train_metrics_queried_are_the_ones_telemetry_exports() -> None:
    """psft_train_<key> in a query must be a key the trainer logs (or GRPO's reward)."""
    queried = {
        m
        for d in DASHBOARDS
        for p in all_panels(d)
        for q in p.queries
        for m in re.findall(r"psft_train_([a-z_]+)", q.expr)
    }
    assert queried - set(TRAIN_METRICS) <= {"reward_mean"}
    fields = {p.field for d in DASHBOARDS for p in all_panels(d) if p.field}
    assert fields - set(TRAIN_METRICS) <= {"reward_mean", "accuracy"}
