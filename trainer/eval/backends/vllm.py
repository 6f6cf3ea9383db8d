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
from collections.abc import Sequence
from dataclasses import replace
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
        outputs = self.llm.generate(requests, params, use_tqdm=False)
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
            progress(len(prompts))
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
