from __future__ import annotations

from pathlib import Path

from psft.trainer.report import (
    best_checkpoints,
    compare_arms,
    eval_rows,
    markdown_report,
    plot_training,
    summarize_training,
)

RECORDS = [
    {"step": 1, "total_steps": 3, "loss": -1.0, "nll": 1.5, "entropy": 1.3, "tokens": 100},
    {"step": 2, "total_steps": 3, "loss": -1.0, "nll": 1.4, "entropy": 1.1, "tokens": 210},
    {"step": 3, "total_steps": 3, "loss": -1.0, "nll": 1.3, "entropy": 1.2, "tokens": 300,
     "val_loss": 1.35, "val_entropy": 1.25, "elapsed_s": 9.5},
]  # fmt: skip


def test_summary_reads_cumulative_tokens_and_entropy_extremes() -> None:
    s = summarize_training(RECORDS)
    assert s["steps"] == 3 and s["tokens"] == 300
    assert s["entropy"] == {"first": 1.3, "last": 1.2, "min": 1.1}
    assert s["val_loss"] == {"first": 1.35, "last": 1.35}
    assert summarize_training([]) == {}


def test_plot_and_markdown(tmp_path: Path) -> None:
    out = plot_training({"train": RECORDS, "grpo": []}, tmp_path / "entropy.png")
    assert out is not None and out.stat().st_size > 5000
    assert plot_training({"train": []}, tmp_path / "none.png") is None
    rows = eval_rows(
        {
            "results": [
                {
                    "benchmark": "aime24",
                    "k": 4,
                    "avg_at_k": 0.25,
                    "pass_at_k": 0.5,
                    "maj_at_k": 0.25,
                    "checkpoint": "final",
                }
            ]
        }
    )
    text = markdown_report(
        {
            "job": "j",
            "objective": "psft",
            "model": "m",
            "training": {"train": summarize_training(RECORDS)},
            "eval": rows,
        }
    )
    assert "|  | final | aime24 | 4 | 0.250 | 0.500 | 0.250 |" in text


def row(arm: str, checkpoint: str, benchmark: str, avg: float, kind: str = "math") -> dict:
    return {"arm": arm, "checkpoint": checkpoint, "benchmark": benchmark, "avg_at_k": avg,
            "type": kind}  # fmt: skip


def test_best_checkpoint_is_the_highest_mean_math_avg_per_arm() -> None:
    rows = [
        row("psft", "step-12", "aime24", 0.30), row("psft", "step-12", "math500", 0.70),
        row("psft", "final", "aime24", 0.20), row("psft", "final", "math500", 0.72),
        row("psft", "final", "gpqa", 0.90, "multiple-choice"),  # not in-domain: ignored
        row("sft", "final", "aime24", 0.10),  # one checkpoint only: nothing to pick
    ]  # fmt: skip
    best = best_checkpoints(rows)
    assert set(best) == {"psft"}
    assert best["psft"]["checkpoint"] == "step-12"
    assert abs(best["psft"]["mean_avg_at_k"] - 0.5) < 1e-12
    assert best["psft"]["benchmarks"] == ["aime24", "math500"]


def test_comparison_puts_the_arms_side_by_side() -> None:
    training = {
        "train": {"arm": "psft", **summarize_training(RECORDS)},
        "train-sft": {"arm": "sft", **summarize_training(RECORDS[:2])},
    }
    evals = [row("psft", "final", "aime24", 0.3), row("sft", "final", "aime24", 0.2)]
    table = compare_arms({"training": training, "eval": evals}, {"train": "psft",
                                                                 "train-sft": "sft"})  # fmt: skip
    assert table["psft"]["entropy_last"] == 1.2 and table["sft"]["entropy_last"] == 1.1
    assert table["psft"]["avg_at_k/aime24"] == 0.3 and table["sft"]["avg_at_k/aime24"] == 0.2
    text = markdown_report({"job": "j", "objective": "psft", "model": "m",
                            "training": training, "eval": evals, "comparison": table})  # fmt: skip
    assert "| entropy_last | 1.2000 | 1.1000 |" in text
    assert "| steps | 3 | 2 |" in text


def test_comparison_without_a_final_eval_uses_the_evaluated_checkpoint() -> None:
    """eval.checkpoints: best evaluates a step-N folder only; an arm missing a benchmark
    still gets its row (the union of both arms' keys)."""
    training = {
        "train": {"arm": "psft", **summarize_training(RECORDS)},
        "train-sft": {"arm": "sft", **summarize_training(RECORDS[:2])},
    }
    evals = [
        row("psft", "step-2", "aime24", 0.3),
        row("sft", "step-1", "aime24", 0.2), row("sft", "step-1", "math500", 0.6),
    ]  # fmt: skip
    table = compare_arms({"training": training, "eval": evals}, {"train": "psft",
                                                                 "train-sft": "sft"})  # fmt: skip
    assert table["psft"]["avg_at_k/aime24"] == 0.3 and table["sft"]["avg_at_k/aime24"] == 0.2
    text = markdown_report({"job": "j", "objective": "psft", "model": "m",
                            "training": training, "eval": evals, "comparison": table})  # fmt: skip
    assert "| avg_at_k/math500 | " in text
