"""Scores of k samples per problem: Avg@k, unbiased pass@k, majority vote, lengths.

- Avg@k: mean accuracy over all k samples of all problems (the seed's headline number).
- pass@k: the unbiased estimator of Chen et al. (2021): with n samples of which c are
  correct, pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems.
- maj@k: the most frequent extracted answer (equal normalised forms vote together; ties
  go to the answer seen first) is graded; no answer at all counts as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

from psft.trainer.eval.grading import normalize_answer


@dataclass(frozen=True)
class Sample:
    answer: str | None
    correct: bool
    tokens: int
    truncated: bool


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(samples: Sequence[Sample]) -> bool:
    votes: dict[str, list[Sample]] = {}
    for s in samples:
        if s.answer is not None:
            votes.setdefault(normalize_answer(s.answer), []).append(s)
    if not votes:
        return False
    winner = max(votes.values(), key=len)  # max keeps the first of equal counts
    # equal normalised forms are graded alike; any of them decides
    return any(s.correct for s in winner)


def pass_at_ks(k: int) -> list[int]:
    """The k values reported in the summary: powers of two up to k, and k itself."""
    values = [1]
    while values[-1] * 2 < k:
        values.append(values[-1] * 2)
    if k not in values:
        values.append(k)
    return values


def summarize(per_problem: Sequence[Sequence[Sample]]) -> dict[str, float | int | dict]:
    """Scores of one benchmark: `per_problem[i]` holds the k samples of problem i."""
    if not per_problem:
        raise ValueError("no problems to score")
    k = len(per_problem[0])
    if k == 0 or any(len(s) != k for s in per_problem):
        raise ValueError("every problem needs the same number (k > 0) of samples")
    flat = [s for samples in per_problem for s in samples]
    correct = [sum(s.correct for s in samples) for samples in per_problem]
    n_problems = len(per_problem)
    return {
        "k": k,
        "problems": n_problems,
        "avg_at_k": sum(correct) / (n_problems * k),
        "pass_at_k": sum(pass_at_k(k, c, k) for c in correct) / n_problems,
        "maj_at_k": sum(majority_correct(s) for s in per_problem) / n_problems,
        "pass_at": {
            str(j): sum(pass_at_k(k, c, j) for c in correct) / n_problems for j in pass_at_ks(k)
        },
        "mean_response_tokens": sum(s.tokens for s in flat) / len(flat),
        "truncated_fraction": sum(s.truncated for s in flat) / len(flat),
        "no_answer_fraction": sum(s.answer is None for s in flat) / len(flat),
    }
