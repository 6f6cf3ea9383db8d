"""What every generation backend takes and returns."""

from __future__ import annotations

from collections.abc import Sequence
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


class Progress(Protocol):
    """How far a backend's `generate` is (e.g. `psft.trainer.eval.progress.GenerationProgress`)."""

    def __call__(self, prompts: int, samples: int | None = None) -> None:
        """Totals so far: `prompts` whose samples are all generated, and `samples` generated
        (None: all samples of those prompts and no others)."""
        ...


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
