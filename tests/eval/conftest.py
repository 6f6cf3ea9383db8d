"""Fixtures of the eval tests: a job around the tiny model and a run folder holding it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from psft.workflows.spec import PSFTJob
from psft.workflows.stages import StageConfig

JobFactory = Callable[..., PSFTJob]


@pytest.fixture
def make_job(tiny_model_dir: Path) -> JobFactory:
    def make(**eval_spec: Any) -> PSFTJob:
        spec = {
            "benchmarks": ["aime24"],
            "samples": 2,
            "limit": 2,
            "maxTokens": 8,
            "batchSize": 2,
            "backend": "transformers",
            **eval_spec,
        }
        return PSFTJob.model_validate(
            {
                "metadata": {"name": "evaltest"},
                "spec": {
                    "model": {"source": str(tiny_model_dir)},
                    # within the tiny model's 2048-token context (stage configs are validated)
                    "dataset": {
                        "train": ["unused.jsonl"],
                        "maxPromptLength": 512,
                        "maxResponseLength": 1024,
                    },
                    "eval": spec,
                    "resources": {"device": "cpu"},
                    "monitoring": {"enabled": False},  # no /metrics server in unit tests
                },
            }
        )

    return make


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs" / "evaltest"
    root.mkdir(parents=True)
    return root


@pytest.fixture
def trained_run(run_root: Path, tiny_model_dir: Path) -> Path:
    """A run whose train stage finished: train/final holds the tiny model."""
    shutil.copytree(tiny_model_dir, run_root / "train" / "final")
    return run_root


def stage_config(job: PSFTJob, run_root: Path, target: str | None = "train") -> StageConfig:
    return StageConfig(
        stage="eval",
        kind="eval",
        job=job,
        run_root=str(run_root),
        target=target,
        metrics_port=0,
        progress=False,
    )


@pytest.fixture
def make_config() -> Callable[..., StageConfig]:
    return stage_config
