"""Names of the evaluation benchmarks shipped with the package (data in psft.trainer.eval)."""

from __future__ import annotations

REGISTERED_BENCHMARKS: dict[str, str] = {
    "aime24": "AIME 2024, 30 problems, integer answers",
    "aime25": "AIME 2025, 30 problems, integer answers",
    "amc23": "AMC 2023, 40 problems",
    "math500": "MATH-500, 500 problems with worked solutions",
    "minerva": "Minerva Math (OCWCourses), 272 problems",
}
