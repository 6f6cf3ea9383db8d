"""transformers `generate` for CPU and single-GPU runs: batched, left-padded, KV cache.

Prompts are sorted by length so a batch wastes little padding, padded on the left (the
generated tokens of every row then start at the same position), and each prompt is
expanded to `n` sequences (`num_return_sequences`). Sampling uses a fresh
GenerationConfig with exactly the spec's parameters (temperature, top-p, no top-k, no
repetition penalty), so the model's own generation defaults cannot change the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psft.trainer.eval.backends.base import Generation, Progress, SamplingConfig
from psft.workflows.errors import UserError

NEUTRAL_PROCESSORS: dict[str, Any] = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_new_tokens": 0,
}
NEUTRAL_WARPERS: dict[str, Any] = {
    "top_k": 0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}
"""Sampling is exactly temperature + top-p (as in vLLM): every other processor is off."""


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in [*eos_ids, tokenizer.eos_token_id] if e is not None}
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        )
        self.context_length = getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int = 8,
    ) -> TransformersBackend:
        from psft.trainer.model import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(
            path,
            device=device,
            dtype=dtype,
            chat_template=chat_template,
            trust_remote_code=trust_remote_code,
        )
        return cls(model, tokenizer, batch_size=batch_size)

    def close(self) -> None:
        self.model = None

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        progress: Progress | None = None,
    ) -> list[list[Generation]]:
        import torch

        torch.manual_seed(sampling.seed)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[Generation] | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            outputs = self._generate_batch([prompts[i] for i in batch], sampling)
            for i, generations in zip(batch, outputs, strict=True):
                results[i] = generations
            if progress is not None:
                progress(len(batch))
        return [r for r in results if r is not None]

    def _generation_config(self, sampling: SamplingConfig, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        # generate() fills every unset (None) field from the model's generation_config, so
        # each logits processor a model may enable by default is set to its neutral value
        common: dict[str, Any] = {
            **NEUTRAL_PROCESSORS,
            "max_new_tokens": max_new_tokens,
            "num_return_sequences": sampling.n,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos_ids),
            "use_cache": True,
        }
        if sampling.temperature > 0:
            return GenerationConfig(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                **NEUTRAL_WARPERS,
                **common,
            )
        return GenerationConfig(do_sample=False, **common)

    def _generate_batch(
        self, prompts: list[Sequence[int]], sampling: SamplingConfig
    ) -> list[list[Generation]]:
        import torch

        width = max(len(p) for p in prompts)
        max_new = sampling.max_tokens
        if self.context_length is not None:
            if width >= self.context_length:
                raise UserError(
                    f"a prompt of {width} tokens does not fit the model's context length "
                    f"({self.context_length}); shorten the system prompt or the problem"
                )
            max_new = min(max_new, self.context_length - width)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=self._generation_config(sampling, max_new),
            )
        new_tokens = out[:, width:].tolist()
        generations: list[list[Generation]] = []
        for p in range(len(prompts)):
            rows = new_tokens[p * sampling.n : (p + 1) * sampling.n]
            generations.append([self._decode(tokens) for tokens in rows])
        return generations

    def _decode(self, tokens: list[int]) -> Generation:
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if end is None else tokens[: end + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text=text, tokens=len(kept), truncated=end is None)
