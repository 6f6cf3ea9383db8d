"""Old log-probs of the first mini-batch (issue 15): both engines optimise the same ratio.

verl (and the seed) take the old log-probs of every mini-batch from an eval-mode forward
before any update. The native engine reuses mini-batch 1's own train-mode forward instead,
which is the same number only when train and eval mode compute the same thing: without
dropout. With dropout it takes an eval-mode forward for mini-batch 1 too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from psft.trainer.engine.step import ObjectiveConfig, old_logprobs, train_eval_differ, train_step

VOCAB = 11


class TinyLM(torch.nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids).cumsum(1)  # token t sees tokens <= t
        return SimpleNamespace(logits=self.head(self.drop(torch.tanh(h))))


def micro(seed: int, b: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, length), generator=g)
    loss_mask = torch.zeros(b, length - 1)
    loss_mask[:, 2:] = 1.0
    loss_mask[0, -2:] = 0.0  # padding
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids[:, 1:].clone(),
        "loss_mask": loss_mask,
    }


def fresh(dropout: float):
    torch.manual_seed(0)
    model = TinyLM(dropout)
    minibatches = [[micro(1), micro(2)], [micro(3), micro(4)]]
    return model, minibatches, torch.optim.SGD(model.parameters(), lr=0.5)


def record_forwards(model: torch.nn.Module) -> list[tuple[bool, bool]]:
    """(grad enabled, train mode) of every forward from now on."""
    calls: list[tuple[bool, bool]] = []
    original = model.forward

    def forward(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), model.training))
        return original(*args, **kwargs)

    model.forward = forward
    return calls


def run(dropout: float, old=None):
    model, minibatches, optimizer = fresh(dropout)
    if callable(old):
        old = old(model, minibatches)
    calls = record_forwards(model)
    torch.manual_seed(7)  # the same dropout masks in every run
    result = train_step(model, optimizer, minibatches, ObjectiveConfig(objective="psft"), old=old)
    return result, [p.detach().clone() for p in model.parameters()], calls


def eval_old_for_all(model, minibatches):
    return [old_logprobs(model, mb) for mb in minibatches]


def test_detects_what_makes_train_and_eval_mode_differ():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert train_eval_differ(TinyLM(0.0)) == []
    assert train_eval_differ(TinyLM(0.1)) == ["drop: Dropout(p=0.1)"]
    assert train_eval_differ(torch.nn.Sequential(torch.nn.BatchNorm1d(3))) == ["0: BatchNorm1d"]

    small = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    assert train_eval_differ(LlamaForCausalLM(LlamaConfig(**small))) == []
    # Llama applies attention dropout functionally: only its config tells
    with_dropout = LlamaForCausalLM(LlamaConfig(attention_dropout=0.1, **small))
    assert train_eval_differ(with_dropout) == ["config.attention_dropout"]


def test_without_dropout_the_first_minibatch_reuses_its_training_forward_exactly():
    default, params, calls = run(0.0)
    # eval-mode no-grad forwards for mini-batch 2 only, then 4 training forwards
    assert calls == [(False, False)] * 2 + [(True, True)] * 4
    assert default.updates == 2 and default.stats.ratio_max > 1.0

    # the very numbers verl computes: eval-mode old log-probs for both mini-batches
    explicit, explicit_params, _ = run(0.0, old=eval_old_for_all)
    assert explicit.stats == default.stats
    assert explicit.loss == default.loss and explicit.entropy == default.entropy
    for a, b in zip(params, explicit_params, strict=True):
        assert torch.equal(a, b)


def test_with_dropout_the_first_minibatch_gets_eval_mode_old_logprobs():
    default, params, calls = run(0.1)
    # eval-mode no-grad forwards for both mini-batches, then 4 training forwards
    assert calls == [(False, False)] * 4 + [(True, True)] * 4

    # the same as handing it eval-mode old log-probs for both mini-batches (what verl does)
    explicit, explicit_params, _ = run(0.1, old=eval_old_for_all)
    assert explicit.stats == default.stats and explicit.loss == default.loss
    for a, b in zip(params, explicit_params, strict=True):
        assert torch.equal(a, b)

    # whereas reusing the dropout forward would have made mini-batch 1's ratio exactly 1
    reused, reused_params, _ = run(0.1, old=lambda m, mbs: [None, old_logprobs(m, mbs[1])])
    assert reused.stats.ratio_sum != default.stats.ratio_sum
    assert any(not torch.equal(a, b) for a, b in zip(params, reused_params, strict=True))


def test_mini_batch_one_ratio_under_dropout_is_train_over_eval():
    """With one mini-batch and dropout, the ratio is dropout-forward / eval-forward (not 1),
    as in verl's engine, which always precomputes old log-probs in eval mode."""
    model, minibatches, optimizer = fresh(0.1)
    result = train_step(model, optimizer, minibatches[:1], ObjectiveConfig(objective="psft"))
    assert result.stats.ratio_max > 1.0
    assert result.stats.means()["ratio_mean"] != pytest.approx(1.0, abs=1e-6)


def step_of(objective: str, dropout: float = 0.0, **config):
    model, minibatches, optimizer = fresh(dropout)
    before = [old_logprobs(model, mb) for mb in minibatches]
    pre_step = sum(
        float((entropy * micro["loss_mask"]).sum())
        for mb, olds in zip(minibatches, before, strict=True)
        for micro, (_, entropy) in zip(mb, olds, strict=True)
    )
    tokens = sum(float(m["loss_mask"].sum()) for mb in minibatches for m in mb)
    torch.manual_seed(7)
    result = train_step(
        model, optimizer, minibatches, ObjectiveConfig(objective=objective, **config)
    )
    return result, pre_step / tokens


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sft_and_psft_log_the_entropy_of_the_pre_step_policy(dropout: float):
    """Issue 15, item 5: the logged entropy is the same quantity for both objectives."""
    sft, sft_pre = step_of("sft", dropout)
    psft, psft_pre = step_of("psft", dropout)
    assert sft_pre == psft_pre  # same model, same batch
    assert sft.entropy == pytest.approx(sft_pre, rel=1e-6)
    assert psft.entropy == pytest.approx(psft_pre, rel=1e-6)
    assert sft.entropy == pytest.approx(psft.entropy, rel=1e-6)


def test_plain_sft_without_pre_step_entropy_reads_the_moving_policy():
    """pre_step_entropy=False (benchmarks' plain SFT): mini-batch 2's entropy comes from a
    policy one update later, so it differs from the pre-step value."""
    moving, pre = step_of("sft", pre_step_entropy=False)
    assert moving.entropy != pytest.approx(pre, rel=1e-6)
