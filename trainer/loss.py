"""The PSFT objective and its metrics: pure torch functions, shared by every engine.

Conventions: `logits` are [B, T, V] and already aligned with `labels` [B, T] (the caller
shifts: logits at position t predict labels at t). `mask` [B, T] is 1 on response tokens
(loss tokens) and 0 on prompt and padding. Everything returned per token is [B, T].

PSFT (arXiv 2508.17784) is PPO's clipped surrogate applied to demonstrations with the
advantage fixed at +1:

    ratio    = exp(logp - old_logp)
    loss_tok = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))

With A = +1 a token below 1 + eps_high gets SFT's gradient scaled by its ratio and a token
above it gets none. For A < 0 (GRPO reuses `policy_loss`) the dual clip bounds the loss
at -A * c. With ratio == 1 (one mini-batch per batch) the PSFT gradient equals SFT's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "micro-token-mean"]
AGG_MODES: tuple[AggMode, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "micro-token-mean",
)
SEQUENCE_COUNTED_MODES: frozenset[str] = frozenset(
    {"seq-mean-token-sum", "seq-mean-token-mean", "micro-token-mean"}
)
"""Modes whose `denominator` is a number of sequences (token-mean's is a number of tokens)."""

LOG_RATIO_LIMIT = 20.0
"""|logp - old_logp| is clamped to this before exp, as verl does, so a ratio stays finite."""

DEFAULT_CHUNK_TOKENS = 4096
"""Rows of [*, V] logits processed at once in float32 by the log-prob/entropy helpers."""


def _row_chunks(n: int, chunk: int) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """log softmax(logits)[label] per position, in float32, without a [B, T, V] log-softmax.

    Uses gather + logsumexp over chunks of positions, so the only full-vocabulary temporary
    is one float32 chunk. Differentiable. Labels outside [0, V) (e.g. -100 padding) give 0.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    valid = (flat_labels >= 0) & (flat_labels < logits.shape[-1])
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    parts = []
    for rows in _row_chunks(flat_logits.shape[0], chunk_tokens):
        chunk = flat_logits[rows].float()
        picked = chunk.gather(-1, safe_labels[rows].unsqueeze(-1)).squeeze(-1)
        parts.append(picked - torch.logsumexp(chunk, dim=-1))
    out = torch.cat(parts) if parts else flat_logits.new_zeros(0, dtype=torch.float32)
    return torch.where(valid, out, torch.zeros_like(out)).reshape(labels.shape)


def token_entropy(logits: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32: logsumexp(z) - sum(softmax(z) * z)."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for rows in _row_chunks(flat.shape[0], chunk_tokens):
        chunk = flat[rows].float()
        lse = torch.logsumexp(chunk, dim=-1)
        probs = torch.softmax(chunk, dim=-1)
        parts.append(lse - (probs * chunk).sum(dim=-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(logits.shape[:-1])


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where mask is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(
    loss_tok: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token losses [B, T] to one scalar.

    - `token-mean`: sum over all response tokens / number of response tokens.
    - `seq-mean-token-sum`: per sequence the sum over its tokens, then the mean over sequences.
    - `seq-mean-token-mean`: per sequence the mean over its tokens, then the mean over sequences.
    - `micro-token-mean`: the token mean of this micro-batch, weighted by its share of the
      mini-batch's sequences: sum / tokens(micro) * sequences(micro) / sequences(mini).
      This is verl's legacy `dp_actor.update_policy` with `use_dynamic_bsz` (the seed's
      normalisation, see docs/loss-normalisation.md). Unlike the other modes its value
      depends on how a mini-batch is cut into micro-batches: with one sequence per
      micro-batch it is `seq-mean-token-mean`, with the whole mini-batch in one micro-batch
      it is `token-mean`.

    `denominator` replaces the count in the final division (tokens for token-mean, sequences
    for the other modes). Gradient accumulation passes the count of the whole mini-batch, so
    that the losses of its micro-batches add up to the mini-batch loss (for the first three
    modes exactly the loss of one forward over the whole mini-batch).
    """
    mask = mask.to(loss_tok.dtype)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(loss_tok.dtype)
    if mode == "token-mean":
        total = (loss_tok * mask).sum()
        count = mask.sum().clamp(min=1.0) if denominator is None else denominator
        return total / count
    if mode == "micro-token-mean":
        token_mean = (loss_tok * mask).sum() / mask.sum().clamp(min=1.0)
        sequences = loss_tok.shape[0]
        count = sequences if denominator is None else denominator
        return token_mean * (sequences / count)
    if mode == "seq-mean-token-sum":
        per_seq = (loss_tok * mask).sum(dim=-1)
    elif mode == "seq-mean-token-mean":
        per_seq = (loss_tok * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")
    count = per_seq.shape[0] if denominator is None else denominator
    return per_seq.sum() / count


@dataclass
class PolicyStats:
    """Sums over the response tokens of one forward pass; add them up, then `.means()`.

    Kept as sums (not means) so that statistics over a whole step are exact whatever the
    micro-batch sizes were.
    """

    tokens: float = 0.0
    clipped: float = 0.0
    """Response tokens whose gradient the clip removed."""
    ratio_sum: float = 0.0
    ratio_max: float = 0.0
    kl_sum: float = 0.0
    """Sum of the k3 estimator of KL(old || new): ratio - 1 - log(ratio)."""

    def __add__(self, other: PolicyStats) -> PolicyStats:
        return PolicyStats(
            tokens=self.tokens + other.tokens,
            clipped=self.clipped + other.clipped,
            ratio_sum=self.ratio_sum + other.ratio_sum,
            ratio_max=max(self.ratio_max, other.ratio_max),
            kl_sum=self.kl_sum + other.kl_sum,
        )

    def means(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        return {
            "clip_fraction": self.clipped / n,
            "ratio_mean": self.ratio_sum / n,
            "ratio_max": self.ratio_max,
            "approx_kl": self.kl_sum / n,
        }


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar to call backward on."""
    stats: PolicyStats


def _stats(
    log_ratio: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor
) -> PolicyStats:
    with torch.no_grad():
        m = mask.bool()
        if not bool(m.any()):
            return PolicyStats()
        r = ratio[m].double()
        k3 = r - 1.0 - log_ratio[m].double()
        return PolicyStats(
            tokens=float(m.sum()),
            clipped=float(clipped[m].sum()),
            ratio_sum=float(r.sum()),
            ratio_max=float(r.max()),
            kl_sum=float(k3.sum()),
        )


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor | float,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_c: float,
    agg_mode: AggMode = "token-mean",
    denominator: float | torch.Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate loss (PPO with dual clip); PSFT passes advantages = 1.0.

    `advantages` is a scalar or a tensor broadcastable to `logp` (GRPO: one value per
    sequence, shape [B, 1]). The clip fraction counts response tokens that get no gradient
    because of a clip: ratio > 1 + clip_high where A > 0; ratio < 1 - clip_low or (dual clip)
    ratio > clip_c where A < 0.
    """
    if clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1, got {clip_c}")
    adv = torch.as_tensor(advantages, dtype=logp.dtype, device=logp.device)
    adv = adv.expand_as(logp)
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    ppo = torch.maximum(unclipped, clipped)
    dual = torch.minimum(ppo, -adv * clip_c)
    loss_tok = torch.where(adv < 0, dual, ppo)

    with torch.no_grad():
        pos_clip = (adv > 0) & (ratio > 1.0 + clip_high)
        neg_clip = (adv < 0) & ((ratio < 1.0 - clip_low) | (ratio > clip_c))
        no_grad = (pos_clip | neg_clip).to(logp.dtype)

    loss = aggregate(loss_tok, mask, agg_mode, denominator)
    return LossOutput(loss, _stats(log_ratio.detach(), ratio.detach(), no_grad, mask))


def sft_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    agg_mode: AggMode = "token-mean",
    denominator: float | torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
) -> LossOutput:
    """Negative log-likelihood of the response tokens (the SFT baseline).

    When `old_logp` is given, ratio/KL statistics are reported too (nothing is clipped),
    so that SFT and PSFT runs log the same metrics.
    """
    loss = aggregate(-logp, mask, agg_mode, denominator)
    if old_logp is None:
        log_ratio = torch.zeros_like(logp)
    else:
        log_ratio = (logp.detach() - old_logp.detach()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    return LossOutput(loss, _stats(log_ratio, ratio, torch.zeros_like(logp), mask))
