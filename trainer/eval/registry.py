"""Benchmarks: the registered ones shipped with the package, and custom files.

A benchmark is a list of problems with reference answers. Registered names
(`psft.workflows.benchmarks.REGISTERED_BENCHMARKS`) load from the package data in
`psft/trainer/eval/data/`. Custom files (JSONL, JSON, Parquet or CSV, local or `s3://`)
are math (problem + answer) or multiple choice in one of three layouts, see docs/eval.md:

- a list column of option texts (`choicesKey`, MMLU-Pro's `options`) and an answer letter
  (or a 0-based index) in `answerKey`;
- option columns `A`, `B`, `C`, ... and an answer letter;
- GPQA's published CSV: `Question`, `Correct Answer`, `Incorrect Answer 1..3`; options
  are shuffled with a fixed seed per question, so every run asks the same order.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from psft.trainer.eval.grading import LETTERS
from psft.trainer.storage.uri import local_input
from psft.workflows.benchmarks import REGISTERED_BENCHMARKS
from psft.workflows.errors import UserError
from psft.workflows.spec import CustomBenchmark

BenchmarkKind = Literal["math", "multiple-choice"]
GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1")


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    """Reference: a math answer, or the letter of the correct option."""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: BenchmarkKind
    problems: list[Problem] = field(default_factory=list)
    source: str = ""

    def limited(self, limit: int | None) -> Benchmark:
        if limit is None:
            return self
        return Benchmark(self.name, self.kind, self.problems[:limit], self.source)


def registry_listing() -> str:
    return ", ".join(f"{n} ({d})" for n, d in sorted(REGISTERED_BENCHMARKS.items()))


def load_registered(name: str) -> Benchmark:
    if name not in REGISTERED_BENCHMARKS:
        raise UserError(
            f"unknown benchmark {name!r}; registered benchmarks: {registry_listing()}. "
            "For another benchmark give a file: {name: ..., path: ..., type: math|multiple-choice}"
        )
    data = resources.files("psft.trainer.eval") / "data" / f"{name}.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    source = f"psft:{name}"
    problems = [
        Problem(str(r["id"]), str(r["problem"]), str(r["answer"]))
        for r in rows  # shipped data: checked by the tests
    ]
    return Benchmark(name, "math", problems, source)


def read_rows(path: Path, what: str = "benchmark file") -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / Parquet / CSV file as dicts (clear errors, no traceback).

    `what` names the file's role in error messages ("benchmark file", "GRPO prompt file").
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
    except FileNotFoundError as exc:
        raise UserError(f"{what} {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what} {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from exc
    except (OSError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(
            f"{what} {path} cannot be read: {' '.join(str(exc).split())}; is this the right file?"
        ) from exc
    bad = [i for i, r in enumerate(rows, start=1) if not isinstance(r, dict)]
    if bad:
        raise UserError(f"{path}: row {bad[0]} is not an object with named columns")
    return rows


def _column(row: dict[str, Any], key: str, path: Path, n: int, option: str) -> Any:
    if key not in row or row[key] is None or row[key] == "":
        have = ", ".join(sorted(map(str, row))) or "none"
        raise UserError(
            f"{path}: row {n} has no column {key!r} (columns: {have}); "
            f"set {option} in the benchmark entry to the column that holds it"
        )
    return row[key]


def _answer_letter(value: Any, n_choices: int, path: Path, n: int, key: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        text = str(value).strip().strip("()").strip()
        if text.isdigit():
            index = int(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            index = LETTERS.index(text.upper())
        else:
            raise UserError(
                f"{path}: row {n}: column {key!r} is {value!r}; expected the letter of the "
                "correct option (A, B, ...) or its 0-based index"
            )
    if not 0 <= index < n_choices:
        raise UserError(
            f"{path}: row {n}: answer {value!r} is outside the {n_choices} options "
            f"(A-{LETTERS[n_choices - 1]})"
        )
    return LETTERS[index]


def _choices(row: dict[str, Any], spec: CustomBenchmark, path: Path, n: int) -> list[str]:
    if spec.choices_key in row and row[spec.choices_key] not in (None, ""):
        value = row[spec.choices_key]
        if isinstance(value, str):
            try:
                value = json.loads(value)  # CSV cells hold JSON lists
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, list | tuple) or not value:
            raise UserError(
                f"{path}: row {n}: column {spec.choices_key!r} must be a list of option texts"
            )
        return [str(c) for c in value]
    lettered = []
    for letter in LETTERS:
        if row.get(letter) in (None, ""):
            break
        lettered.append(str(row[letter]))
    if len(lettered) >= 2:
        return lettered
    _column(row, spec.choices_key, path, n, "choicesKey")  # raises with the columns listed
    return []


def _gpqa_problem(row: dict[str, Any], path: Path, n: int, name: str) -> Problem:
    correct = str(_column(row, "Correct Answer", path, n, "the GPQA column")).strip()
    wrong = [
        str(row[k]).strip()
        for k in ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
        if row.get(k) not in (None, "")
    ]
    question = str(_column(row, "Question", path, n, "the GPQA column")).strip()
    options = [correct, *wrong]
    seed = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    random.Random(seed).shuffle(options)
    pid = str(row.get("Record ID") or f"{name}-{n - 1}")
    return Problem(pid, question, LETTERS[options.index(correct)], tuple(options))


def load_custom(spec: CustomBenchmark, fetch: Callable[[str], Path] | None = None) -> Benchmark:
    """A benchmark from a user file; `fetch` turns an s3:// URI into a local path."""
    if spec.path.startswith("s3://"):
        if fetch is None:
            from psft.trainer.storage import fetch_uri as fetch
        path = Path(fetch(spec.path))
    else:
        path = local_input(spec.path)
    rows = read_rows(path)
    if not rows:
        raise UserError(f"benchmark {spec.name!r}: {path} has no rows")
    problems = []
    for n, row in enumerate(rows, start=1):
        pid = str(row.get("id", f"{spec.name}-{n - 1}"))
        if spec.type == "math":
            problem = str(_column(row, spec.problem_key, path, n, "problemKey"))
            answer = str(_column(row, spec.answer_key, path, n, "answerKey")).strip()
            problems.append(Problem(pid, problem, answer))
        elif all(c in row for c in GPQA_COLUMNS) and spec.problem_key not in row:
            problems.append(_gpqa_problem(row, path, n, spec.name))
        else:
            problem = str(_column(row, spec.problem_key, path, n, "problemKey"))
            choices = _choices(row, spec, path, n)
            if len(choices) > len(LETTERS):
                raise UserError(f"{path}: row {n} has {len(choices)} options; at most 16")
            value = _column(row, spec.answer_key, path, n, "answerKey")
            answer = _answer_letter(value, len(choices), path, n, spec.answer_key)
            problems.append(Problem(pid, problem, answer, tuple(choices)))
    return Benchmark(spec.name, spec.type, problems, spec.path)


def load_benchmark(
    entry: str | CustomBenchmark, fetch: Callable[[str], Path] | None = None
) -> Benchmark:
    if isinstance(entry, str):
        return load_registered(entry)
    return load_custom(entry, fetch)
