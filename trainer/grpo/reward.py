"""GRPO reward: 1 when the last \\boxed{} answer of a completion matches the reference.

Grading is psft.trainer.eval.grading.grade_math (the evaluation stage's grader), so a
reward of 1 during RL means exactly what accuracy means in evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psft.trainer.eval.grading import grade_math


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as message lists, plain ones as strings."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def math_rewards(completions: list[Any], answers: list[str], timeout: float) -> list[float]:
    return [
        1.0 if grade_math(completion_text(c), str(a), timeout=timeout) else 0.0
        for c, a in zip(completions, answers, strict=True)
    ]


def make_reward_function(timeout: float) -> Callable[..., list[float]]:
    """A TRL reward function (`reward_funcs=[...]`) that also logs `accuracy`."""

    def boxed_math_reward(completions, answer, log_metric=None, **_: Any) -> list[float]:
        rewards = math_rewards(list(completions), list(answer), timeout)
        if log_metric is not None and rewards:
            log_metric("accuracy", sum(rewards) / len(rewards))
        return rewards

    return boxed_math_reward
