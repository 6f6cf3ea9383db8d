"""Small PSFTJobs and stage configs for tests of storage and metrics."""

from __future__ import annotations

from typing import Any

from psft.workflows.layout import run_root
from psft.workflows.pipeline import build_pipeline
from psft.workflows.spec import PSFTJob
from psft.workflows.stages import StageConfig, stage_config


def make_job(name: str = "demo", *, storage: dict[str, Any] | None = None, **spec: Any) -> PSFTJob:
    body: dict[str, Any] = {
        "model": {"source": "tiny"},
        "dataset": {"train": ["data.jsonl"]},
        **spec,
    }
    if storage is not None:
        body["storage"] = storage
    return PSFTJob.model_validate(
        {
            "apiVersion": "psft.dev/v1alpha1",
            "kind": "PSFTJob",
            "metadata": {"name": name},
            "spec": body,
        }
    )


def make_stage_config(job: PSFTJob, stage: str = "train", **extra: Any) -> StageConfig:
    (found,) = [s for s in build_pipeline(job) if s.name == stage]
    return stage_config(job, found, run_root(job), **extra)
