"""The PSFT objective: gradients, clipping, masks, aggregation, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from psft.trainer.loss import (
    AGG_MODES,
    PolicyStats,
    aggregate,
    policy_loss,
    sft_loss,
    token_entropy,
    token_logprobs,
)

CLIP = dict(clip_low=0.2, clip_high=0.28, clip_c=10.0)


def _batch(seed: int = 0, b: int = 3, t: int = 7, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    # prompt (first two tokens), response, padding (last tokens of rows 1 and 2)
    mask = torch.zeros(b, t)
    mask[:, 2:] = 1
    mask[1, 5:] = 0
    mask[2, 4:] = 0
    return logits, labels, mask.double()


def test_token_logprobs_match_log_softmax_and_chunking() -> None:
    logits, labels, _ = _batch()
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    for chunk in (1, 4, 4096):
        got = token_logprobs(logits, labels, chunk_tokens=chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_token_logprobs_ignore_index_gives_zero() -> None:
    logits, labels, _ = _batch()
    labels[0, 3] = -100
    assert token_logprobs(logits, labels)[0, 3].item() == 0.0


def test_entropy_matches_direct_computation() -> None:
    logits, _, _ = _batch(seed=1)
    direct = torch.distributions.Categorical(logits=logits).entropy()
    for chunk in (3, 4096):
        torch.testing.assert_close(token_entropy(logits, chunk).double(), direct, atol=1e-5, rtol=0)
    uniform = torch.zeros(1, 1, 50)
    assert token_entropy(uniform).item() == pytest.approx(math.log(50), rel=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_one_minibatch_psft_gradient_equals_sft(mode: str) -> None:
    """Ratio == 1 on the first (here: only) mini-batch, so PSFT is SFT exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11)).double()
    _, labels, mask = _batch()
    inputs = labels.roll(1, dims=1)

    def grads(objective: str) -> list[torch.Tensor]:
        model.zero_grad()
        logp = token_logprobs(model(inputs), labels)
        with torch.no_grad():
            old = token_logprobs(model(inputs), labels)
        if objective == "psft":
            out = policy_loss(logp, old, 1.0, mask, agg_mode=mode, **CLIP)
        else:
            out = sft_loss(logp, mask, agg_mode=mode)
        out.loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    psft, sft = grads("psft"), grads("sft")
    assert any(g.abs().sum() > 0 for g in sft)
    for a, b in zip(psft, sft, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clip_removes_gradient_above_one_plus_eps_high_and_scales_below() -> None:
    logits, labels, mask = _batch(seed=2)
    mask = torch.ones_like(mask)
    leaf = logits.clone().requires_grad_(True)
    logp = token_logprobs(leaf, labels)
    # choose ratios per token: some far above 1+eps_high, some below it (also below 1-eps_low)
    ratios = torch.full(labels.shape, 1.1)
    ratios[0, :] = 1.5
    ratios[1, 3] = 1.29
    ratios[2, 1] = 0.5
    old = logp.detach() - torch.log(ratios)

    leaf.grad = None
    policy_loss(logp, old, 1.0, mask, agg_mode="token-mean", **CLIP).loss.backward()
    psft_grad = leaf.grad.clone()

    leaf2 = logits.clone().requires_grad_(True)
    sft_loss(token_logprobs(leaf2, labels), mask, agg_mode="token-mean").loss.backward()
    sft_grad = leaf2.grad

    above = ratios > 1.28
    assert above.sum() == labels.shape[1] + 1
    assert torch.all(psft_grad[above] == 0)
    expected = sft_grad * ratios.unsqueeze(-1).double()
    torch.testing.assert_close(psft_grad[~above], expected[~above], rtol=1e-5, atol=1e-7)


def test_clip_fraction_ratio_and_kl_statistics() -> None:
    logp = torch.zeros(1, 4)
    ratios = torch.tensor([[1.0, 1.5, 0.5, 2.0]])
    old = -torch.log(ratios)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the ratio-2 token is padding
    out = policy_loss(logp, old, 1.0, mask, **CLIP)
    s = out.stats.means()
    assert out.stats.tokens == 3
    assert s["clip_fraction"] == pytest.approx(1 / 3)
    assert s["ratio_mean"] == pytest.approx(1.0, rel=1e-6)
    assert s["ratio_max"] == pytest.approx(1.5, rel=1e-6)
    k3 = [(r - 1 - math.log(r)) for r in (1.0, 1.5, 0.5)]
    assert s["approx_kl"] == pytest.approx(sum(k3) / 3, rel=1e-5)


def test_masks_exclude_prompt_and_padding() -> None:
    logits, labels, mask = _batch(seed=3)
    for mode in AGG_MODES:
        leaf = logits.clone().requires_grad_(True)
        logp = token_logprobs(leaf, labels)
        old = logp.detach() - 0.1
        out = policy_loss(logp, old, 1.0, mask, agg_mode=mode, **CLIP)
        out.loss.backward()
        outside = mask == 0
        assert torch.all(leaf.grad[outside] == 0), mode
        assert leaf.grad[~outside].abs().sum() > 0, mode
        # changing logits outside the mask leaves the loss unchanged
        noisy = logits.clone()
        noisy[outside] += 5.0
        logp2 = token_logprobs(noisy, labels)
        out2 = policy_loss(logp2, old, 1.0, mask, agg_mode=mode, **CLIP)
        torch.testing.assert_close(out2.loss, out.loss.detach())
        assert out2.stats.tokens == mask.sum().item()


def test_aggregation_modes_hand_computed() -> None:
    loss_tok = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # token-mean: (1+2+3+4+5)/5 = 3
    assert aggregate(loss_tok, mask, "token-mean").item() == pytest.approx(3.0)
    # seq-mean-token-sum: (6 + 9)/2 = 7.5
    assert aggregate(loss_tok, mask, "seq-mean-token-sum").item() == pytest.approx(7.5)
    # seq-mean-token-mean: (2 + 4.5)/2 = 3.25
    assert aggregate(loss_tok, mask, "seq-mean-token-mean").item() == pytest.approx(3.25)
    # micro-token-mean, the whole batch one micro-batch: its token mean, 3
    assert aggregate(loss_tok, mask, "micro-token-mean").item() == pytest.approx(3.0)
    # ... as one micro-batch of a mini-batch of 4 sequences: 3 * 2/4
    assert aggregate(loss_tok, mask, "micro-token-mean", 4).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(loss_tok, mask, "mean")  # type: ignore[arg-type]


def test_psft_loss_value_hand_computed() -> None:
    # ratios 1.1, 1.5 (clipped to 1.28), 0.5 (lower clip inert for A=+1)
    logp = torch.zeros(1, 3)
    old = -torch.log(torch.tensor([[1.1, 1.5, 0.5]]))
    mask = torch.ones(1, 3)
    out = policy_loss(logp, old, 1.0, mask, **CLIP)
    assert out.loss.item() == pytest.approx(-(1.1 + 1.28 + 0.5) / 3, rel=1e-6)


@pytest.mark.parametrize("mode", [m for m in AGG_MODES if m != "micro-token-mean"])
def test_denominator_makes_micro_batches_add_up(mode: str) -> None:
    logits, labels, mask = _batch(seed=4, b=4)
    logp = token_logprobs(logits, labels)
    old = logp - 0.05
    full = policy_loss(logp, old, 1.0, mask, agg_mode=mode, **CLIP).loss
    denom = mask.sum() if mode == "token-mean" else mask.shape[0]
    parts = [
        policy_loss(
            logp[i : i + 2],
            old[i : i + 2],
            1.0,
            mask[i : i + 2],
            agg_mode=mode,
            denominator=denom,
            **CLIP,
        ).loss
        for i in (0, 2)
    ]
    torch.testing.assert_close(sum(parts), full)


def test_negative_advantage_dual_clip() -> None:
    logits = torch.zeros(1, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 1, 2]])
    logp = token_logprobs(logits, labels)
    ratios = torch.tensor([[0.5, 1.0, 20.0]])
    old = logp.detach() - torch.log(ratios)
    mask = torch.ones(1, 3)
    out = policy_loss(logp, old, -1.0, mask, agg_mode="seq-mean-token-sum", **CLIP)
    # per token: max(r, clip(r)) -> 0.8 (lower clip), 1.0, then dual clip caps 20 at c = 10
    assert out.loss.item() == pytest.approx(0.8 + 1.0 + 10.0, rel=1e-5)
    out.loss.backward()
    assert torch.all(logits.grad[0, 0] == 0) and torch.all(logits.grad[0, 2] == 0)
    assert logits.grad[0, 1].abs().sum() > 0
    assert out.stats.means()["clip_fraction"] == pytest.approx(2 / 3)


def test_sft_reports_ratio_statistics_and_stats_add() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2)
    out = sft_loss(logp, mask, old_logp=logp - math.log(2.0))
    assert out.loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    s = out.stats.means()
    assert s["ratio_mean"] == pytest.approx(2.0, rel=1e-6) and s["clip_fraction"] == 0
    total = out.stats + PolicyStats(tokens=2, clipped=1, ratio_sum=2, ratio_max=1, kl_sum=0)
    assert total.tokens == 4 and total.ratio_max == pytest.approx(2.0, rel=1e-6)
    assert total.means()["clip_fraction"] == pytest.approx(0.25)


def test_micro_token_mean_weights_each_micro_batch_by_its_sequences() -> None:
    """micro-token-mean (the seed's verl normalisation): each micro-batch's token mean,
    weighted by its share of the mini-batch's sequences. Cut into single sequences it is
    seq-mean-token-mean; left whole it is token-mean; in between, neither."""
    logits, labels, mask = _batch(seed=5, b=4)
    mask[3, 3:] = 0  # lengths 5, 3, 2, 1
    logp = token_logprobs(logits, labels)
    # ratios between 1 and exp(0.2) < 1 + clip_high: different per token, none clipped
    old = logp - 0.2 * torch.rand(logp.shape, generator=torch.Generator().manual_seed(6))

    def micro(rows: list[list[int]]) -> torch.Tensor:
        parts = [
            policy_loss(
                logp[r], old[r], 1.0, mask[r], agg_mode="micro-token-mean", denominator=4, **CLIP
            ).loss
            for r in rows
        ]
        return sum(parts)

    def whole(mode: str) -> torch.Tensor:
        return policy_loss(logp, old, 1.0, mask, agg_mode=mode, **CLIP).loss

    torch.testing.assert_close(micro([[0], [1], [2], [3]]), whole("seq-mean-token-mean"))
    torch.testing.assert_close(micro([[0, 1, 2, 3]]), whole("token-mean"))
    halves = micro([[0, 1], [2, 3]])
    loss_tok = -torch.exp(logp - old)
    by_hand = sum(
        (loss_tok[r] * mask[r]).sum() / mask[r].sum() * len(r) / 4 for r in ([0, 1], [2, 3])
    )
    assert float(halves) == pytest.approx(float(by_hand), rel=1e-6)
    assert abs(float(halves - whole("token-mean"))) > 1e-3
    assert abs(float(halves - whole("seq-mean-token-mean"))) > 1e-3
