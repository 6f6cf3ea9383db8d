"""PSFTJob examples of the repository, for the workflows and spec tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

EXPECTED_ERRORS: dict[str, list[str]] = {}
"""Examples that `validate_job` refuses on purpose: file name -> field paths of the errors."""


def example_files() -> list[Path]:
    """Every PSFTJob document under examples/ (other kinds are skipped)."""
    found = []
    for path in sorted((REPO / "examples").rglob("*.y*ml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        if any(d.get("kind") == "PSFTJob" for d in docs):
            found.append(path)
    return found


def psftjob_docs(path: Path) -> list[dict[str, Any]]:
    return [
        d
        for d in yaml.safe_load_all(path.read_text())
        if isinstance(d, dict) and d.get("kind") == "PSFTJob"
    ]


# The smallest valid PSFTJob: a model and a training file; every other field defaulted.
MINIMAL_JOB = {
    "apiVersion": "psft.dev/v1alpha1",
    "kind": "PSFTJob",
    "metadata": {"name": "demo"},
    "spec": {
        "model": {"source": "smollm2-135m-instruct"},
        "dataset": {"train": ["data.jsonl"]},
    },
}
