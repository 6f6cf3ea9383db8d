"""Fixtures of the workflows tests: the generated CRD and every PSFTJob example."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # workflow_examples


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    from psft.workflows.crd import build_crd

    return build_crd()


@pytest.fixture(scope="session")
def openapi(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="session")
def minimal_doc() -> dict[str, Any]:
    return {
        "apiVersion": "psft.dev/v1alpha1",
        "kind": "PSFTJob",
        "metadata": {"name": "tiny"},
        "spec": {"model": {"source": "/models/tiny"}, "dataset": {"train": ["train.jsonl"]}},
    }
