"""GRPO prompt sets: files with a problem and its reference answer per row.

Every row must carry a non-empty answer: the reward grades against it. A file without
answers is refused here, before any model is loaded or any rollout starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psft.trainer.eval.registry import read_rows
from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJob


@dataclass(frozen=True)
class PromptRow:
    messages: list[dict[str, str]]
    answer: str
    source: str
    """file:row, for error messages and logs."""


def _answer(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def load_prompts(job: PSFTJob, files: list[tuple[str, Path]]) -> list[PromptRow]:
    """Rows of every prompt file (name as written in the spec, local path)."""
    grpo = job.spec.grpo
    system = job.spec.dataset.system_prompt
    if not files:
        raise UserError("spec.grpo.prompts: GRPO is enabled but no prompt files are given")
    rows: list[PromptRow] = []
    for name, path in files:
        data = read_rows(path, what="GRPO prompt file")
        if not data:
            raise UserError(f"spec.grpo.prompts: {name} holds no rows")
        for i, row in enumerate(data):
            where = f"{name} row {i}"
            if not isinstance(row, dict):
                raise UserError(f"spec.grpo.prompts: {where} is not an object")
            if grpo.answer_key not in row:
                raise UserError(
                    f"spec.grpo.answerKey: {where} has no {grpo.answer_key!r} column "
                    f"(columns: {', '.join(map(str, row))}); the reward needs a reference "
                    "answer for every prompt"
                )
            answer = _answer(row[grpo.answer_key])
            if answer is None:
                raise UserError(
                    f"spec.grpo.answerKey: {where} has an empty {grpo.answer_key!r}; the "
                    "reward needs a reference answer for every prompt"
                )
            problem = row.get(grpo.prompt_key)
            if isinstance(problem, list):
                messages = [dict(m) for m in problem]
            elif isinstance(problem, str) and problem.strip():
                messages = [{"role": "user", "content": problem}]
            else:
                raise UserError(
                    f"spec.grpo.promptKey: {where} has no prompt in column {grpo.prompt_key!r}"
                )
            if system and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": system}, *messages]
            rows.append(PromptRow(messages=messages, answer=answer, source=where))
    return rows
