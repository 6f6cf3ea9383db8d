"""The eval stage on what the real train stage wrote: checkpoints, markers, val_loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psft.workflows.cli import main
from psft.workflows.spec import PSFTJob
from psft.workflows.stages import StageConfig

ROWS = [
    {
        "prompt": [{"role": "user", "content": f"What is {i} + 3?"}],
        "demonstration": f"We add: {i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}.",
    }
    for i in range(16)
]
FITS_THE_TINY_MODEL = {"maxPromptLength": 512, "maxResponseLength": 1024}
"""Token budgets within the tiny model's 2048-token context (a stage config is validated)."""


def _config(job: PSFTJob, root: Path, kind: str, target: str | None = None) -> Path:
    config = StageConfig(
        stage=kind, kind=kind, job=job, run_root=str(root), target=target, progress=False
    )
    path = root.parent / f"{kind}.json"
    path.write_text(config.dump())
    return path


def test_all_and_best_checkpoints_of_a_real_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    held_out = tmp_path / "sums.jsonl"
    held_out.write_text(json.dumps({"problem": "What is 4 + 3?", "answer": "7"}) + "\n")
    job = PSFTJob.model_validate(
        {
            "metadata": {"name": "t"},
            "spec": {
                "model": {"source": str(tiny_model_dir)},
                "dataset": {"train": [str(data)], "validation": {"fraction": 0.25},
                            **FITS_THE_TINY_MODEL},
                "psft": {"batchSize": 2, "miniBatchSize": 1, "microBatchSize": 1,
                         "maxSteps": 4, "saveEvery": 2, "keepCheckpoints": 2,
                         "warmupSteps": 0, "learningRate": 1e-3},
                "eval": {"benchmarks": [{"name": "sums", "path": str(held_out)}],
                         "samples": 2, "maxTokens": 6, "backend": "transformers",
                         "checkpoints": "all"},
                "resources": {"device": "cpu"},
                "monitoring": {"enabled": False},
            },
        }
    )  # fmt: skip
    root = tmp_path / "run"
    assert main(["prepare", "--config", str(_config(job, root, "prepare"))]) == 0
    assert main(["train", "--config", str(_config(job, root, "train"))]) == 0

    assert main(["eval", "--config", str(_config(job, root, "eval", target="train"))]) == 0
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["checkpoints"] == ["step-2", "final"]  # step 4 is the final model
    assert [(r["checkpoint"], r["checkpoint_step"]) for r in summary["results"]] == [
        ("step-2", 2), ("final", 4)
    ]  # fmt: skip
    assert (root / "eval" / "step-2" / "sums.jsonl").is_file()

    val = {
        r["step"]: r["val_loss"]
        for r in map(json.loads, (root / "train" / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    }
    assert set(val) == {0, 2, 4}  # step 0: the starting policy's baseline
    job.spec.eval.checkpoints = "best"
    assert main(["eval", "--config", str(_config(job, root, "eval", target="train"))]) == 0
    summary = json.loads((root / "eval" / "summary.json").read_text())
    metrics = (root / "eval" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1  # the rerun replaced the first run's rows
    best = min((s for s in val if s > 0), key=lambda s: val[s])  # no checkpoint at step 0
    assert summary["checkpoints"] == ["step-2" if best == 2 else "final"]


def test_eval_before_training_says_to_train_first(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = PSFTJob.model_validate(
        {
            "metadata": {"name": "t"},
            "spec": {
                "model": {"source": str(tiny_model_dir)},
                "dataset": {"train": ["x.jsonl"], **FITS_THE_TINY_MODEL},
                "eval": {"checkpoints": "final"},
                "monitoring": {"enabled": False},
            },
        }
    )
    config = _config(job, tmp_path / "run", "eval", target="train")
    assert main(["eval", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train/final does not exist" in err and "run the train stage first" in err
