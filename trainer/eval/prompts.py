"""Prompts for evaluation: the model's chat template and the training system prompt.

Math problems are asked as they are, under the same system prompt as training (the seed:
"Please reason step by step, and put your final answer within \\boxed{}."). Multiple
choice uses one fixed template with lettered options that asks for the letter in a box,
which `grading.extract_choice` reads (it also understands "The answer is (X)").
"""

from __future__ import annotations

from typing import Any

from psft.trainer.eval.grading import LETTERS
from psft.trainer.eval.registry import Benchmark, Problem
from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJobSpec

MULTIPLE_CHOICE_TEMPLATE = (
    "Answer the following multiple choice question. Think step by step, then give the "
    "letter of the correct option within \\boxed{{}}, for example \\boxed{{A}}.\n\n"
    "{question}\n\n{options}"
)


def eval_system_prompt(spec: PSFTJobSpec) -> str | None:
    """eval.systemPrompt when set, else dataset.systemPrompt; an empty string means none."""
    prompt = spec.eval.system_prompt
    if prompt is None:
        prompt = spec.dataset.system_prompt
    return prompt or None


def format_options(choices: tuple[str, ...] | list[str]) -> str:
    return "\n".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(choices))


def user_message(problem: Problem, kind: str) -> str:
    if kind == "multiple-choice":
        return MULTIPLE_CHOICE_TEMPLATE.format(
            question=problem.problem.strip(), options=format_options(problem.choices)
        )
    return problem.problem


def build_messages(problem: Problem, kind: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_message(problem, kind)})
    return messages


def encode_prompts(
    tokenizer: Any, benchmark: Benchmark, system_prompt: str | None
) -> list[list[int]]:
    """Token ids of every problem's chat prompt, ending with the assistant turn header."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the model's tokenizer has no chat template; set model.chatTemplate in the job "
            "(the same template training used)"
        )
    out = []
    for problem in benchmark.problems:
        messages = build_messages(problem, benchmark.kind, system_prompt)
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if hasattr(ids, "input_ids"):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out
