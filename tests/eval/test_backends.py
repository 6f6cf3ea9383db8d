"""Generation backends: transformers on the tiny model; vLLM through a stand-in module."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from psft.trainer.eval.backends import choose_backend
from psft.trainer.eval.backends.base import Generation, SamplingConfig
from psft.trainer.eval.backends.transformers import NucleusFilter, TransformersBackend
from psft.trainer.eval.backends.vllm import VLLMBackend
from psft.workflows.errors import UserError


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> TransformersBackend:
    return TransformersBackend.load(tiny_model_dir, device="cpu", dtype="float32", batch_size=4)


def _prompts(backend: TransformersBackend) -> list[list[int]]:
    texts = ["What is 2 + 3?", "Find x such that 3x = 12. Dividing by 3 gives", "Compute"]
    return [
        backend.tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, return_dict=False
        )
        for t in texts
    ]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(
    backend: TransformersBackend,
) -> None:
    prompts = _prompts(backend)
    assert len({len(p) for p in prompts}) == 3  # different lengths: padding matters
    greedy = SamplingConfig(n=1, temperature=0.0, top_p=1.0, max_tokens=6, seed=0)
    batched = backend.generate(prompts, greedy)
    backend.batch_size = 1
    try:
        single = backend.generate(prompts, greedy)
    finally:
        backend.batch_size = 4
    assert batched == single
    assert all(len(g) == 1 and 0 < g[0].tokens <= 6 for g in batched)


def test_n_samples_per_prompt_seeded(backend: TransformersBackend) -> None:
    prompts = _prompts(backend)
    done: list[tuple[int, int | None]] = []
    sampling = SamplingConfig(n=3, temperature=1.0, top_p=0.95, max_tokens=5, seed=7)
    first = backend.generate(prompts, sampling, progress=lambda p, s=None: done.append((p, s)))
    assert [len(g) for g in first] == [3, 3, 3]
    assert done[-1] == (3, 9)
    assert backend.generate(prompts, sampling) == first  # same seed, same samples
    other = backend.generate(prompts, SamplingConfig(3, 1.0, 0.95, 5, seed=8))
    assert other != first
    texts = {g.text for gens in first for g in gens}
    assert len(texts) > 1  # sampling, not n copies of one answer


def test_progress_counts_samples_within_a_batch(backend: TransformersBackend) -> None:
    """Samples count as done when they reach EOS, each decode step, not only when the
    whole batch returns (a CPU batch can take minutes)."""
    prompts = _prompts(backend)
    seen: list[tuple[int, int | None]] = []
    saved = backend.eos_ids
    backend.eos_ids = set(range(backend.model.config.vocab_size))  # every token ends one
    backend.batch_size = 2
    try:
        out = backend.generate(
            prompts,
            SamplingConfig(2, 1.0, 1.0, max_tokens=4, seed=3),
            progress=lambda p, s=None: seen.append((p, s)),
        )
    finally:
        backend.eos_ids, backend.batch_size = saved, 4
    assert all(g.tokens == 1 and not g.truncated for gens in out for g in gens)
    # batch 1 (2 prompts x 2 samples): its 4 samples end during generate, then the batch
    # returns; batch 2 (1 prompt) likewise
    assert seen == [(0, 4), (2, 4), (2, 6), (3, 6)]


def test_token_budget_and_truncation(backend: TransformersBackend) -> None:
    prompts = _prompts(backend)
    out = backend.generate(prompts, SamplingConfig(2, 1.0, 1.0, max_tokens=3, seed=1))
    for gens in out:
        for g in gens:
            assert g.tokens <= 3
            assert g.truncated == (g.tokens == 3 and not g.text.endswith("")) or g.tokens <= 3
    eos = backend.tokenizer.eos_token_id
    pad = backend.pad_id
    assert backend._decode([5, 6, eos, pad, pad]) == Generation(
        backend.tokenizer.decode([5, 6], skip_special_tokens=True), 3, False
    )
    assert backend._decode([5, 6, 7]).truncated
    assert backend._decode([5, 6, 7]).tokens == 3


def test_generation_config_is_exactly_the_spec(backend: TransformersBackend) -> None:
    defaults = backend.model.generation_config
    saved = defaults.to_dict()
    # defaults a model may ship; generate() would apply them to every unset field
    defaults.update(
        repetition_penalty=3.0,
        top_k=5,
        min_p=0.3,
        no_repeat_ngram_size=2,
        min_new_tokens=4,
        typical_p=0.5,
    )
    try:
        cfg = backend._generation_config(SamplingConfig(4, 0.7, 0.95, 99, 0), 99)
        effective, _ = backend.model._prepare_generation_config(cfg)
        assert (effective.do_sample, effective.temperature, effective.top_p) == (True, 0.7, 1.0)
        (nucleus,) = backend._logits_processors(SamplingConfig(4, 0.7, 0.95, 99, 0))
        assert isinstance(nucleus, NucleusFilter) and nucleus.top_p == 0.95  # top-p is ours
        assert effective.num_return_sequences == 4 and effective.max_new_tokens == 99
        assert effective.use_cache and effective.num_beams == 1
        assert effective.top_k == 0 and effective.min_p == 0.0 and effective.typical_p == 1.0
        assert effective.repetition_penalty == 1.0 and effective.no_repeat_ngram_size == 0
        assert effective.min_new_tokens == 0
        greedy = backend._generation_config(SamplingConfig(1, 0.0, 0.95, 9, 0), 9)
        assert backend.model._prepare_generation_config(greedy)[0].do_sample is False
    finally:
        defaults.update(**saved)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
def test_nucleus_filter_equals_transformers_top_p(top_p: float) -> None:
    import torch
    from transformers import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    vocab = 5000
    peaked = torch.randn(4, vocab, generator=generator) * 8  # nucleus within the candidates
    flat = torch.randn(3, vocab, generator=generator) * 0.1  # nucleus needs a full sort
    for scores in (peaked, flat, torch.cat([peaked, flat])):
        ours = NucleusFilter(top_p, candidates=64)(None, scores.clone())
        reference = TopPLogitsWarper(top_p)(None, scores.clone())
        probs = scores.softmax(-1)
        for row, col in (torch.isinf(ours) != torch.isinf(reference)).nonzero().tolist():
            # only float rounding at the boundary may differ: the mass above that token
            # equals top_p to float precision
            mass_above = probs[row][probs[row] > probs[row, col]].sum().item()
            assert mass_above == pytest.approx(top_p, abs=1e-6)
        kept = ~torch.isinf(ours)
        assert torch.equal(ours[kept], scores[kept])
    assert NucleusFilter(1.0)(None, peaked) is peaked


def test_prompt_longer_than_the_context_is_a_user_error(backend: TransformersBackend) -> None:
    too_long = [[5] * (backend.context_length + 1)]
    with pytest.raises(UserError, match="context length"):
        backend.generate(too_long, SamplingConfig(1, 0.0, 1.0, 4, 0))


# vLLM ------------------------------------------------------------------------------------


class StandInVLLM(types.ModuleType):
    """Records what the adapter passes to vLLM and answers like vLLM's offline API."""

    def __init__(self) -> None:
        super().__init__("vllm")
        self.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        self.llm_kwargs: list[dict[str, Any]] = []
        self.generate_calls: list[tuple[Any, Any, dict[str, Any]]] = []
        module = self

        class SamplingParams:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs: Any) -> None:
                module.llm_kwargs.append(kwargs)

            def generate(self, prompts: Any, sampling_params: Any, **kwargs: Any) -> list[Any]:
                module.generate_calls.append((prompts, sampling_params, kwargs))
                per_prompt = sampling_params if isinstance(sampling_params, list) else None
                n = (per_prompt or [sampling_params])[0].kwargs["n"]
                use_tqdm = kwargs.get("use_tqdm", True)
                if callable(use_tqdm):
                    module.run_engine(use_tqdm, len(prompts), n)
                return [
                    types.SimpleNamespace(
                        prompt_token_ids=p["prompt_token_ids"],
                        outputs=[
                            types.SimpleNamespace(
                                index=i,
                                text=f"sample {i} \\boxed{{{i}}}",
                                token_ids=list(range(i + 2)),
                                finish_reason="length" if i == n - 1 else "stop",
                            )
                            for i in range(n)
                        ],
                    )
                    for p in prompts
                ]

        self.LLM = LLM
        self.SamplingParams = SamplingParams
        self.bar_totals: list[int] = []

    def run_engine(self, use_tqdm: Any, prompts: int, n: int) -> None:
        """What vLLM's LLM does with a `use_tqdm` factory: "Adding requests" over the
        prompts, then a bar over the unfinished requests (each prompt's n samples), updated
        by n per finished prompt, its speed read from format_dict and shown in postfix."""
        assert list(use_tqdm(range(prompts), desc="Adding requests")) == list(range(prompts))
        total = prompts * n
        bar = use_tqdm(total=total, desc="Processed prompts", dynamic_ncols=True, postfix="")
        self.bar_totals.append(total)
        for _ in range(prompts):
            speed = 100 / bar.format_dict["elapsed"]
            bar.postfix = f"est. speed output: {speed:.2f} toks/s"
            bar.update(n)
            if bar.n == total:
                bar.refresh()
        bar.close()


def test_vllm_adapter_passes_exactly_these_arguments() -> None:
    vllm = StandInVLLM()
    backend = VLLMBackend(
        "/models/m",
        tensor_parallel_size=4,
        dtype="bfloat16",
        seed=3,
        trust_remote_code=False,
        vllm=vllm,
    )
    assert vllm.llm_kwargs == [
        {
            "model": "/models/m",
            "tokenizer": "/models/m",
            "tensor_parallel_size": 4,
            "dtype": "bfloat16",
            "seed": 3,
            "trust_remote_code": False,
            "gpu_memory_utilization": 0.9,
        }
    ]
    out = backend.generate([[1, 2, 3], [4]], SamplingConfig(3, 0.7, 0.95, 128, seed=11))
    ((prompts, params, kwargs),) = vllm.generate_calls
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    assert params.kwargs == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 128,
        "seed": 11,
    }
    assert kwargs == {"use_tqdm": False}
    assert out[0] == [
        Generation("sample 0 \\boxed{0}", 2, False),
        Generation("sample 1 \\boxed{1}", 3, False),
        Generation("sample 2 \\boxed{2}", 4, True),
    ]
    greedy = backend.sampling_params(SamplingConfig(1, 0.0, 0.95, 8, 0))
    assert greedy.kwargs["top_p"] == 1.0 and greedy.kwargs["temperature"] == 0.0


def test_vllm_adapter_reports_progress_through_vllms_bar() -> None:
    vllm = StandInVLLM()
    backend = VLLMBackend("/m", vllm=vllm)
    seen: list[tuple[int, int | None]] = []
    backend.generate(
        [[1], [2], [3], [4]],
        SamplingConfig(2, 0.7, 0.95, 8, seed=1),
        progress=lambda p, s=None: seen.append((p, s)),
    )
    ((_, _, kwargs),) = vllm.generate_calls
    assert callable(kwargs["use_tqdm"]) and vllm.bar_totals == [8]
    # as vLLM finishes each prompt's samples, then once more when generate returns
    assert seen == [(1, 2), (2, 4), (3, 6), (4, 8), (4, 8)]


def test_vllm_budget_stays_within_the_context_length() -> None:
    vllm = StandInVLLM()
    backend = VLLMBackend("/m", context_length=10, vllm=vllm)
    backend.generate([[1, 2, 3], [1] * 8], SamplingConfig(2, 0.7, 0.95, 128, seed=1))
    ((_, params, _),) = vllm.generate_calls
    assert [p.kwargs["max_tokens"] for p in params] == [7, 2]  # one SamplingParams per prompt
    assert all(p.kwargs["n"] == 2 and p.kwargs["seed"] == 1 for p in params)
    backend.generate([[1, 2]], SamplingConfig(2, 0.7, 0.95, 5, seed=1))
    assert vllm.generate_calls[-1][1].kwargs["max_tokens"] == 5  # fits: one shared object
    with pytest.raises(UserError, match="context length"):
        backend.generate([[1] * 10], SamplingConfig(1, 0.7, 0.95, 5, seed=1))


def test_choose_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_backend("transformers", cuda=True) == "transformers"
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    real_vllm_installed = importlib.util.find_spec("vllm") is not None
    if not real_vllm_installed:
        assert choose_backend("auto", cuda=True) == "transformers"
        with pytest.raises(UserError, match="vLLM is not installed"):
            choose_backend("vllm")
    monkeypatch.setitem(sys.modules, "vllm", StandInVLLM())
    assert choose_backend("auto", cuda=True) == "vllm"
    assert choose_backend("auto", cuda=False) == "transformers"
    assert choose_backend("vllm") == "vllm"


def test_eval_stage_on_the_vllm_backend(
    trained_run: Path,
    make_job: Any,
    make_config: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from psft.trainer.eval import stage

    vllm = StandInVLLM()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    data = tmp_path / "ones.jsonl"
    data.write_text(json.dumps({"problem": "1*1?", "answer": "1"}) + "\n")
    job = make_job(
        benchmarks=[{"name": "ones", "path": str(data)}],
        backend="vllm",
        samples=3,
        temperature=0.6,
        topP=0.9,
        maxTokens=77,
        seed=5,
        tensorParallelSize=2,
    )
    job.spec.model.dtype = "bfloat16"
    summary = stage.run(make_config(job, trained_run))

    (kwargs,) = vllm.llm_kwargs
    final = str(trained_run / "train" / "final")
    assert (kwargs["model"], kwargs["tokenizer"]) == (final, final)
    assert (kwargs["tensor_parallel_size"], kwargs["dtype"], kwargs["seed"]) == (2, "bfloat16", 5)
    ((prompts, params, _),) = vllm.generate_calls
    assert params.kwargs == {"n": 3, "temperature": 0.6, "top_p": 0.9, "max_tokens": 77, "seed": 5}
    # the prompt is the chat template applied by our tokenizer, as token ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    text = tokenizer.decode(prompts[0]["prompt_token_ids"])
    assert text.endswith("<|im_start|>user\n1*1?<|im_end|>\n<|im_start|>assistant\n")
    (row,) = summary["results"]
    assert summary["backend"] == "vllm"
    assert row["avg_at_k"] == pytest.approx(1 / 3)  # the stand-in answers 0, 1, 2
    assert row["pass_at_k"] == 1.0 and row["truncated_fraction"] == pytest.approx(1 / 3)
