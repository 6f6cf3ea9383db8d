"""vLLM offline generation for GPU pods: one `LLM`, `LLM.generate` with `n=k`, no HTTP hop.

vLLM cannot be installed on CPU-only machines (no CPU wheel, > 2 GB), so this adapter is
deliberately thin: it builds `LLM(...)` and `SamplingParams(...)` from the spec and maps
the outputs back. Prompts are token ids (our tokenizer with the job's chat template), so
vLLM does not re-apply a template or add a second BOS. A test drives it with a stand-in
`vllm` module that checks every argument we pass.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from psft.trainer.eval.backends.base import Generation, Progress, SamplingConfig
from psft.workflows.errors import UserError


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def import_vllm() -> ModuleType:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise UserError(
            f"eval.backend is 'vllm' but vLLM cannot be imported ({exc}); use the GPU trainer "
            "image, or eval.backend: transformers (or auto) on this machine"
        ) from exc


class VLLMProgressBar:
    """The part of tqdm's interface vLLM's `LLM.generate` uses, reporting to a Progress.

    vLLM calls the `use_tqdm` factory with `total=<unfinished requests>` and updates the
    bar as requests finish (by the number of samples of each), reading
    `format_dict["elapsed"]` for its speed estimate and setting `postfix`; it may also call
    it with an iterable ("Adding requests"), which is passed through. Progress goes by the
    finished share of `total`, which holds whether vLLM counts prompts or samples.
    """

    disable = False

    def __init__(
        self,
        progress: Progress,
        prompts: int,
        n: int,
        iterable: Iterable[Any] | None = None,
        *args: Any,
        total: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.progress = progress
        self.prompts = prompts
        self.samples = prompts * n
        self.iterable = iterable
        self.total = total
        self.n = 0
        self.postfix: Any = kwargs.get("postfix")
        self.started = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def __len__(self) -> int:
        return len(self.iterable) if isinstance(self.iterable, Sized) else int(self.total or 0)

    @property
    def format_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)  # vLLM divides by it
        return {"n": self.n, "total": self.total, "elapsed": elapsed}

    def update(self, n: float = 1) -> bool | None:
        self.n += n
        if self.iterable is None and self.total:
            share = min(self.n / self.total, 1.0)
            self.progress(int(share * self.prompts + 1e-9), int(share * self.samples + 1e-9))
        return None

    def __enter__(self) -> VLLMProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # refresh(), set_postfix(), set_description(), ...: nothing to draw
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        path: Path | str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.9,
        context_length: int | None = None,
        vllm: ModuleType | None = None,
    ) -> None:
        self.vllm = vllm if vllm is not None else import_vllm()
        self.context_length = context_length
        """Prompt + generated tokens per sequence; vLLM rejects requests beyond it."""
        kwargs: dict[str, Any] = {
            "model": str(path),
            "tokenizer": str(path),
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "seed": seed,
            "trust_remote_code": trust_remote_code,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm: Any = self.vllm.LLM(**kwargs)

    def sampling_params(self, sampling: SamplingConfig) -> Any:
        return self.vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        progress: Progress | None = None,
    ) -> list[list[Generation]]:
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        budgets = [self._budget(len(p), sampling.max_tokens) for p in prompts]
        params: Any = self.sampling_params(sampling)
        if any(b != sampling.max_tokens for b in budgets):  # one SamplingParams per prompt
            params = [self.sampling_params(replace(sampling, max_tokens=b)) for b in budgets]
        # vLLM reports finished requests to a tqdm bar; `use_tqdm` takes a factory of one,
        # so ours forwards them to `progress` (one generate call keeps vLLM's batching)
        use_tqdm: Any = False
        if progress is not None:
            use_tqdm = partial(VLLMProgressBar, progress, len(prompts), sampling.n)
        outputs = self.llm.generate(requests, params, use_tqdm=use_tqdm)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        results = []
        for request in outputs:
            samples = [
                Generation(
                    text=c.text,
                    tokens=len(c.token_ids),
                    truncated=c.finish_reason == "length",
                )
                for c in request.outputs
            ]
            if len(samples) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples, expected {sampling.n}")
            results.append(samples)
        if progress is not None:
            progress(len(prompts), len(prompts) * sampling.n)
        return results

    def _budget(self, prompt_tokens: int, max_tokens: int) -> int:
        if self.context_length is None:
            return max_tokens
        room = self.context_length - prompt_tokens
        if room <= 0:
            raise UserError(
                f"a prompt of {prompt_tokens} tokens does not fit the model's context length "
                f"({self.context_length}); shorten the system prompt or the problem"
            )
        return min(max_tokens, room)

    def close(self) -> None:
        self.llm = None
