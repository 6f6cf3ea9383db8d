"""What every generation backend takes and returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingConfig:
    n: int
    """Samples per prompt (k)."""
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    """Generated tokens, the final EOS included."""
    truncated: bool
    """Stopped by the token budget (or the context length), not by EOS."""


Progress = Callable[[int], None]
"""Called with the number of prompts just finished."""


class Backend(Protocol):
    name: str

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        progress: Progress | None = None,
    ) -> list[list[Generation]]:
        """`sampling.n` generations for each prompt (token ids, chat template applied)."""
        ...

    def close(self) -> None: ...
