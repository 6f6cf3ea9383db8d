from __future__ import annotations

from pathlib import Path

from psft.trainer.report import eval_rows, markdown_report, plot_training, summarize_training

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
    assert "| final | aime24 | 4 | 0.250 | 0.500 | 0.250 |" in text
