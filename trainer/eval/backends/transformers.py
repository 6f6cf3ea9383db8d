"""transformers `generate` for CPU and single-GPU runs: batched, left-padded, KV cache.

Prompts are sorted by length so a batch wastes little padding, padded on the left (the
generated tokens of every row then start at the same position), and each prompt is
expanded to `n` sequences (`num_return_sequences`). Sampling uses a fresh
GenerationConfig with exactly the spec's parameters (temperature, top-p, no top-k, no
repetition penalty), so the model's own generation defaults cannot change the numbers;
top-p runs in `NucleusFilter`, which avoids a full-vocabulary sort per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


class NucleusFilter:
    """Top-p (nucleus) filtering without sorting the whole vocabulary every step.

    Keeps the most probable tokens until their mass reaches `top_p` (a token stays when the
    mass ranked above it is below `top_p`), the same rule as transformers' TopPLogitsWarper
    and vLLM. It looks at the `candidates` most probable tokens first (a top-k instead of a
    sort of ~50k logits: the sort was a sixth of a CPU decode step at batch 8) and sorts
    the full row only when those do not reach `top_p`, so the result is exact.
    """

    def __init__(self, top_p: float, candidates: int = 256) -> None:
        self.top_p = top_p
        self.candidates = candidates

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.top_p >= 1.0:
            return scores
        probs = scores.float().softmax(dim=-1)
        k = min(self.candidates, scores.shape[-1])
        top_probs, top_idx = probs.topk(k, dim=-1)
        wide = top_probs.sum(dim=-1) < self.top_p
        if bool(wide.any()):
            rows = wide.nonzero().squeeze(1)
            full_probs, full_idx = probs[rows].sort(dim=-1, descending=True)
            filtered = torch.full_like(scores, float("-inf"))
            narrow = (~wide).nonzero().squeeze(1)
            if len(narrow):
                filtered[narrow] = self(input_ids, scores[narrow])
            filtered[rows] = self._keep(scores[rows], full_probs, full_idx)
            return filtered
        return self._keep(scores, top_probs, top_idx)

    def _keep(self, scores: Any, sorted_probs: Any, sorted_idx: Any) -> Any:
        import torch

        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep = mass_above < self.top_p
        keep[:, 0] = True
        kept_scores = scores.gather(1, sorted_idx).masked_fill(~keep, float("-inf"))
        return torch.full_like(scores, float("-inf")).scatter(1, sorted_idx, kept_scores)


def finished_counter(eos_ids: set[int], report: Callable[[int], None]) -> Any:
    """A stopping criterion that never stops anything: it counts the sequences of a batch
    that have emitted EOS (each generate step) and calls `report(count)` when it grows,
    so progress advances within a batch, not only when the whole batch ends."""
    import torch
    from transformers import StoppingCriteria

    class FinishedCounter(StoppingCriteria):
        def __init__(self) -> None:
            self.finished: Any = None
            self.count = 0
            self.eos: Any = None

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            if self.eos is None or self.eos.device != input_ids.device:
                self.eos = torch.tensor(sorted(eos_ids), device=input_ids.device)
            ended = torch.isin(input_ids[:, -1], self.eos)
            self.finished = ended if self.finished is None else self.finished | ended
            count = int(self.finished.sum())
            if count > self.count:
                self.count = count
                report(count)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return FinishedCounter()


def _criteria(counter: Any) -> Any:
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([counter] if counter is not None else [])


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
        done = 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            counter = None
            if progress is not None:
                counter = finished_counter(
                    self.eos_ids, lambda n, done=done: progress(done, done * sampling.n + n)
                )
            outputs = self._generate_batch([prompts[i] for i in batch], sampling, counter)
            for i, generations in zip(batch, outputs, strict=True):
                results[i] = generations
            done += len(batch)
            if progress is not None:
                progress(done, done * sampling.n)
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
                top_p=1.0,  # top-p is applied by NucleusFilter (after temperature)
                **NEUTRAL_WARPERS,
                **common,
            )
        return GenerationConfig(do_sample=False, **common)

    def _logits_processors(self, sampling: SamplingConfig) -> Any:
        from transformers import LogitsProcessorList

        if sampling.temperature > 0 and sampling.top_p < 1.0:
            return LogitsProcessorList([NucleusFilter(sampling.top_p)])
        return LogitsProcessorList()

    def _generate_batch(
        self, prompts: list[Sequence[int]], sampling: SamplingConfig, counter: Any = None
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
                logits_processor=self._logits_processors(sampling),
                stopping_criteria=_criteria(counter),
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
