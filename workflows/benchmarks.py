"""Names of the evaluation benchmarks shipped with the package (data in psft.trainer.eval)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

REGISTERED_BENCHMARKS: dict[str, str] = {
    "aime24": "AIME 2024, 30 problems, integer answers",
    "aime25": "AIME 2025, 30 problems, integer answers",
    "amc23": "AMC 2023, 40 problems",
    "math500": "MATH-500, 500 problems with worked solutions",
    "minerva": "Minerva Math (OCWCourses), 272 problems",
}


def final_or_last(rows: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Eval rows by benchmark, one each: the `final` checkpoint's, else the last listed
    (eval.checkpoints: best or all evaluate step-N folders too)."""
    picked: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        name = row.get("benchmark")
        if name and (name not in picked or picked[name].get("checkpoint") != "final"):
            picked[name] = row
    return picked
