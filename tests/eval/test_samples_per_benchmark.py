"""eval.samplesPerBenchmark: k per benchmark, as the seed's evaluation (32 for AIME/AMC,
8 for MATH-500/Minerva)."""

from __future__ import annotations

import pytest

from psft.trainer.eval.stage import sampling_config
from psft.workflows.spec import PSFTJob
from psft.workflows.stages import StageConfig
from psft.workflows.validate import InvalidJob, validate_job


def doc(**eval_spec) -> dict:
    return {
        "metadata": {"name": "t"},
        "spec": {
            "model": {"source": "m"},
            "dataset": {"train": ["d.jsonl"]},
            "eval": {"benchmarks": ["aime24", "math500"], **eval_spec},
        },
    }


def test_k_per_benchmark_overrides_samples() -> None:
    job = validate_job(doc(samples=32, samplesPerBenchmark={"math500": 8}))
    config = StageConfig(stage="eval", kind="eval", job=job, run_root="runs/t", target="train")
    assert sampling_config(config, "math500").n == 8
    assert sampling_config(config, "aime24").n == 32
    assert sampling_config(config).n == 32


def test_a_name_that_is_not_evaluated_is_refused() -> None:
    with pytest.raises(InvalidJob) as info:
        validate_job(doc(samplesPerBenchmark={"minerva": 8}))
    (error,) = info.value.errors
    assert error.path == "spec.eval.samplesPerBenchmark.minerva"
    assert "aime24, math500" in error.message


def test_values_are_bounded_like_samples() -> None:
    with pytest.raises(ValueError):
        PSFTJob.model_validate(doc(samplesPerBenchmark={"math500": 0}))
