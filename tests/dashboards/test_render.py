"""PNGs of the dashboard panels from metrics.jsonl, for the local run report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from psft.workflows.dashboards import local_panels, render_panels
from psft.workflows.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, records: list[dict[str, Any]], torn: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"step": 99, "entr' if torn else ""))
    return path


def train_records(decay: float, steps: int = 20) -> list[dict[str, Any]]:
    records = []
    for s in range(1, steps + 1):
        r = {
            "step": s,
            "total_steps": steps,
            "entropy": math.exp(-decay * s),
            "loss": 1.0 / s,
            "clip_fraction": 0.01 * (s % 3),
            "ratio_mean": 1.0,
            "ratio_max": 1.2,
            "approx_kl": 1e-4 * s,
            "grad_norm": 1.0 + s,
            "learning_rate": 1e-6 * min(1.0, s / 5),
            "tokens_per_second": 1000.0,
            "elapsed_s": float(s),
        }
        if s % 10 == 0:
            r |= {"val_loss": 1.2 / s, "val_entropy": math.exp(-decay * s)}
        records.append(r)
    return records


def test_psft_and_sft_runs_share_each_panel(tmp_path: Path) -> None:
    psft = write_jsonl(tmp_path / "psft.jsonl", train_records(0.01), torn=True)
    sft = write_jsonl(tmp_path / "sft.jsonl", train_records(0.2))
    evals = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {"benchmark": "aime24", "k": 4, "checkpoint": "final", "accuracy": 0.1},
            {"benchmark": "amc23", "k": 4, "checkpoint": "final", "avg_at_k": 0.45},
        ],
    )
    out = tmp_path / "report"
    written = render_panels({"psft": psft, "sft": sft}, out, eval_files={"psft": evals})
    names = {p.name for p in written}
    expected = {
        "entropy.png", "loss.png", "clip_fraction.png", "ratio_mean.png", "ratio_max.png",
        "approx_kl.png", "grad_norm.png", "learning_rate.png", "tokens_per_second.png",
        "eval_accuracy.png",
    }  # fmt: skip
    assert names == expected
    assert "grpo_reward.png" not in names, "no GRPO records: no empty GRPO panel"
    for path in written:
        assert path.parent == out and path.read_bytes().startswith(PNG_MAGIC)
        height, width, _ = imread(path).shape
        assert width > 400 and height > 250


def test_grpo_reward_is_drawn_from_grpo_records(tmp_path: Path) -> None:
    grpo = write_jsonl(
        tmp_path / "grpo.jsonl",
        [{"step": s, "reward_mean": s / 10, "entropy": 0.5} for s in range(1, 6)],
    )
    names = {p.name for p in render_panels({"grpo": grpo}, tmp_path / "out")}
    assert names == {"grpo_reward.png", "entropy.png"}


def test_a_panel_draws_the_same_data_it_reads(tmp_path: Path) -> None:
    """Two runs with different entropy curves give different pictures; equal, equal."""
    a = write_jsonl(tmp_path / "a.jsonl", train_records(0.01))
    b = write_jsonl(tmp_path / "b.jsonl", train_records(0.3))
    first = render_panels({"run": a}, tmp_path / "1")
    again = render_panels({"run": a}, tmp_path / "2")
    other = render_panels({"run": b}, tmp_path / "3")
    pick = {p.name: p for p in first}["entropy.png"]
    assert (imread(pick) == imread(tmp_path / "2" / "entropy.png")).all()
    assert not (imread(pick) == imread(tmp_path / "3" / "entropy.png")).all()
    assert len(first) == len(again) == len(other)


def test_every_local_panel_names_a_field() -> None:
    keys = [p.key for p in local_panels()]
    assert len(keys) == len(set(keys))
    assert {"entropy", "loss", "clip_fraction", "eval_accuracy", "grpo_reward"} <= set(keys)


def test_missing_metrics_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl"):
        render_panels({"psft": tmp_path / "nope.jsonl"}, tmp_path / "out")
    with pytest.raises(UserError, match="at least one"):
        render_panels({}, tmp_path / "out")


def test_records_without_numbers_draw_nothing(tmp_path: Path) -> None:
    empty = write_jsonl(
        tmp_path / "m.jsonl",
        [{"step": 1, "entropy": None}, {"step": 2, "entropy": float("nan")}, {"note": "x"}],
    )
    assert render_panels({"run": empty}, tmp_path / "out") == []
