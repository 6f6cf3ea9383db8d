"""One PSFT/SFT training step: the function every engine runs per global batch.

A step takes the global batch split into mini-batches (one optimizer update each) and
micro-batches (one forward/backward each, gradients accumulated):

1. old log-probs and entropy of mini-batches 2..k under the policy before any update,
   with no grad, in eval mode (as verl and the seed compute them). Mini-batch 1 needs no
   extra forward when the model computes the same thing in train and eval mode (no active
   dropout, see `train_eval_differ`): before the first update its training forward's own
   detached log-probs are then exactly the eval-mode old log-probs (ratio exactly 1). A
   model with dropout gets an eval-mode no-grad forward for mini-batch 1 too, so that both
   engines (verl always precomputes every mini-batch) optimise the same ratio.
2. for each mini-batch: forward/backward of its micro-batches with the clipped-ratio loss
   (objective psft) or cross-entropy (objective sft), then one clipped optimizer update.

SFT takes the same no-grad forwards for their entropy alone, so both objectives log the
same quantity: the entropy of the pre-step policy on the step's batch (the curves the
paper compares). `ObjectiveConfig.pre_step_entropy=False` gives plain SFT without them
(its entropy is then read from the training forwards, the policy just before each
mini-batch's update); benchmarks use it to time SFT as other trainers run it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from psft.trainer.loss import (
    SEQUENCE_COUNTED_MODES,
    AggMode,
    LossOutput,
    PolicyStats,
    policy_loss,
    sft_loss,
    token_entropy,
)
from psft.trainer.loss import token_logprobs as logprobs_from_logits

MicroBatch = dict[str, torch.Tensor]
"""collate() output on the model's device: input_ids, attention_mask, labels, loss_mask."""


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the step needs from the spec (psft section), engine-independent."""

    objective: Literal["psft", "sft"] = "psft"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    loss_agg_mode: AggMode = "token-mean"
    grad_clip: float = 1.0
    pre_step_entropy: bool = True
    """SFT: log the pre-step policy's entropy (no-grad forwards of mini-batches 2..k), the
    quantity PSFT logs. PSFT computes it anyway (its old log-probs)."""

    @classmethod
    def from_spec(cls, spec: Any) -> ObjectiveConfig:
        return cls(
            objective=spec.objective,
            clip_ratio_low=spec.clip_ratio_low,
            clip_ratio_high=spec.clip_ratio_high,
            clip_ratio_c=spec.clip_ratio_c,
            loss_agg_mode=spec.loss_agg_mode,
            grad_clip=spec.grad_clip,
        )


@dataclass
class StepResult:
    loss: float
    """Mean over the step's updates of the mini-batch loss (the objective's own value)."""
    nll: float
    """Token-mean negative log-likelihood of the trained tokens (comparable across objectives)."""
    entropy: float
    """Token-mean entropy over the batch's response tokens (see module doc for when)."""
    grad_norm: float
    """Mean pre-clip gradient norm of the updates."""
    stats: PolicyStats
    response_tokens: int
    tokens: int
    """Non-padding tokens (prompt + response) of the batch."""
    updates: int
    skipped_updates: int = 0
    """Updates dropped because the gradient norm was not finite."""
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "nll": self.nll,
            "entropy": self.entropy,
            "grad_norm": self.grad_norm,
            **self.stats.means(),
            **self.extra,
        }


def forward_logits(model: torch.nn.Module, micro: MicroBatch) -> torch.Tensor:
    """Logits [B, L-1, V] aligned with micro['labels'] (the last position predicts nothing)."""
    out = model(
        input_ids=micro["input_ids"], attention_mask=micro["attention_mask"], use_cache=False
    )
    return out.logits[:, :-1, :]


def policy_forward(
    model: torch.nn.Module, micro: MicroBatch, *, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [B, L-1], entropy [B, L-1] or None); log-probs carry grad if enabled."""
    logits = forward_logits(model, micro)
    logp = logprobs_from_logits(logits, micro["labels"])
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = token_entropy(logits.detach())
    return logp, entropy


@torch.no_grad()
def old_logprobs(
    model: torch.nn.Module, micros: Sequence[MicroBatch]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(old_logp, entropy) per micro-batch under the current policy, without grad."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for micro in micros:
            logp, entropy = policy_forward(model, micro, with_entropy=True)
            out.append((logp.detach(), entropy))
        return out
    finally:
        model.train(was_training)


DROPOUT_CONFIG_KEYS = ("dropout", "pdrop")
"""Substrings of model-config keys that name a dropout probability. Hugging Face attention
applies `config.attention_dropout` functionally (no nn.Dropout module to find)."""


def _config_dropouts(config: Any, depth: int = 0) -> list[str]:
    """Names of the dropout probabilities > 0 in a (possibly nested) model config."""
    if depth > 4:
        return []
    values = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(values, dict):
        return []
    found = []
    for key, value in values.items():
        if isinstance(value, dict):
            found += [f"{key}.{k}" for k in _config_dropouts(value, depth + 1)]
        elif (
            any(part in str(key).lower() for part in DROPOUT_CONFIG_KEYS)
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value > 0
        ):
            found.append(str(key))
    return found


def train_eval_differ(model: torch.nn.Module) -> list[str]:
    """Why a train-mode forward of `model` may differ from an eval-mode one (empty: it
    cannot): dropout modules with p > 0, batch-norm layers (they use batch statistics in
    train mode), and dropout probabilities > 0 in the model's config."""
    reasons = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            reasons.append(f"{name or kind}: {kind}(p={module.p})")
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            reasons.append(f"{name or kind}: {kind}")
    config = getattr(model, "config", None)
    if config is not None:
        reasons += [f"config.{key}" for key in _config_dropouts(config)]
    return reasons


def _denominator(micros: Sequence[MicroBatch], agg_mode: str) -> float:
    """The whole mini-batch's count that each micro-batch's loss is divided by: response
    tokens (token-mean) or sequences (the other modes, micro-token-mean included)."""
    if agg_mode in SEQUENCE_COUNTED_MODES:
        return float(sum(m["loss_mask"].shape[0] for m in micros))
    return max(float(sum(m["loss_mask"].sum() for m in micros)), 1.0)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values.float() * mask).sum())


def clip_and_step(
    params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float
) -> tuple[float, bool]:
    """Clip the global gradient norm and update; a non-finite norm skips the update."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    value = float(norm)
    if math.isfinite(value):
        optimizer.step()
        stepped = True
    else:
        stepped = False
    optimizer.zero_grad(set_to_none=True)
    return value, stepped


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    minibatches: Sequence[Sequence[MicroBatch]],
    config: ObjectiveConfig,
    *,
    old: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]] | None] | None = None,
    advantages: Callable[[int, int], torch.Tensor | float] | None = None,
) -> StepResult:
    """One global batch: old log-probs, then one clipped update per mini-batch.

    `old` may supply precomputed (old_logp, entropy) per micro-batch of every mini-batch
    (a rollout engine already has them; None for a mini-batch means: its own training
    forward, detached). By default they are computed here as described in the module doc:
    eval-mode no-grad forwards for mini-batches 2..k, and for mini-batch 1 as well when
    `train_eval_differ(model)` finds dropout, since reusing a train-mode forward as the old
    policy is exact only without it. `advantages(minibatch, micro)` gives per-micro-batch
    advantages (GRPO); PSFT's is +1 everywhere.
    """
    started = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    psft = config.objective == "psft"
    if old is None:
        pre_step = psft or config.pre_step_entropy
        reuse_first = not train_eval_differ(model)
        old = [
            None if (i == 0 and reuse_first) or not pre_step else old_logprobs(model, mb)
            for i, mb in enumerate(minibatches)
        ]
    model.train()
    optimizer.zero_grad(set_to_none=True)

    stats = PolicyStats()
    loss_total = nll_sum = entropy_sum = norm_sum = 0.0
    response_tokens = tokens = skipped = 0
    for i, micros in enumerate(minibatches):
        denominator = _denominator(micros, config.loss_agg_mode)
        mb_old = old[i] if i < len(old) else None
        mb_loss = 0.0
        for j, micro in enumerate(micros):
            mask = micro["loss_mask"]
            fresh_entropy = mb_old is None  # entropy from this forward (reused first, sft)
            logp, entropy = policy_forward(model, micro, with_entropy=fresh_entropy)
            if mb_old is not None:
                old_logp, entropy = mb_old[j]
            else:
                # mini-batch 1 of a model without dropout (train_eval_differ): before any
                # update its train-mode forward is the eval-mode old policy, ratio == 1
                old_logp = logp.detach()
            if psft or advantages is not None:
                adv = 1.0 if advantages is None else advantages(i, j)
                out: LossOutput = policy_loss(
                    logp,
                    old_logp,
                    adv,
                    mask,
                    clip_low=config.clip_ratio_low,
                    clip_high=config.clip_ratio_high,
                    clip_c=config.clip_ratio_c,
                    agg_mode=config.loss_agg_mode,
                    denominator=denominator,
                )
            else:
                out = sft_loss(logp, mask, agg_mode=config.loss_agg_mode, denominator=denominator)
            out.loss.backward()
            mb_loss += float(out.loss.detach())
            stats = stats + out.stats
            nll_sum += _masked_sum(-logp.detach(), mask)
            assert entropy is not None
            entropy_sum += _masked_sum(entropy, mask)
            response_tokens += int(mask.sum())
            tokens += int(micro["attention_mask"].sum())
        norm, stepped = clip_and_step(params, optimizer, config.grad_clip)
        norm_sum += norm if math.isfinite(norm) else 0.0
        skipped += 0 if stepped else 1
        loss_total += mb_loss

    n_updates = len(minibatches)
    denom_tokens = max(response_tokens, 1)
    return StepResult(
        loss=loss_total / n_updates,
        nll=nll_sum / denom_tokens,
        entropy=entropy_sum / denom_tokens,
        grad_norm=norm_sum / max(n_updates - skipped, 1),
        stats=stats,
        response_tokens=response_tokens,
        tokens=tokens,
        updates=n_updates,
        skipped_updates=skipped,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, micros: Sequence[MicroBatch]) -> dict[str, float]:
    """Held-out token-mean NLL and entropy over the response tokens of `micros`."""
    was_training = model.training
    model.eval()
    nll = entropy = count = 0.0
    try:
        for micro in micros:
            logp, ent = policy_forward(model, micro, with_entropy=True)
            mask = micro["loss_mask"]
            nll += _masked_sum(-logp, mask)
            entropy += _masked_sum(ent, mask)
            count += float(mask.sum())
    finally:
        model.train(was_training)
    count = max(count, 1.0)
    return {"val_loss": nll / count, "val_entropy": entropy / count}
