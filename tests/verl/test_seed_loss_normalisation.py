"""`micro-token-mean` against verl's own code: the seed's loss normalisation (issue 15).

The seed (zwhong714/PSFT, a verl 0.5.0.dev fork) trained with verl's legacy
`DataParallelPPOActor.update_policy` and `use_dynamic_bsz=True`. verl 0.9.1 no longer ships
that actor (its wheel has no verl/workers/actor/), so `seed_update` below mirrors its lines
and calls the verl 0.9.1 functions they call. The lines mirrored, from the seed's
verl/verl/workers/actor/dp_actor.py (update_policy) and verl/verl/workers/fsdp_workers.py:

- fsdp_workers.py 210-211: `ppo_mini_batch_size *= rollout.n; ppo_mini_batch_size //=
  dp world size`, so `config.ppo_mini_batch_size` is the per-GPU share of a mini-batch;
- dp_actor.py 395-397: `micro_batches, _ = prepare_dynamic_batch(mini_batch, max_token_len)`
  (0.9.1's `verl.utils.seqlen_balancing.prepare_dynamic_batch`);
- dp_actor.py 416-417: `loss_scale_factor = response_mask.shape[0] / ppo_mini_batch_size`;
- dp_actor.py 434-446: `policy_loss_fn = get_policy_loss_fn(loss_mode)` ("vanilla", i.e.
  `compute_policy_loss_vanilla`), called with loss_agg_mode="token-mean";
- dp_actor.py 468-473: `loss = policy_loss * loss_scale_factor; loss.backward()`;
- FSDP then averages the gradients of the data-parallel ranks.

The seed's `agg_loss` took no global batch information: token-mean was the masked mean of
the micro-batch. verl 0.9.1's `agg_loss` computes the same with the actor config's default
`global_batch_info={}` (dp_size 1, batch_num_tokens None), which is what is used here
(the seed's masked mean adds 1e-8 to the token count: a 1e-10 relative difference).

Our side runs the same micro-batches through the native engine's `train_step` and through
the verl engine's loss function (`psft_engine_loss`, one call per rank and micro-batch,
ranks' gradients averaged as FSDP does). The model is float64, so the verl engine's loss
(fed verl's log-probs) must agree to rounding (1e-12); the native engine computes its
log-probs in float32 (psft.trainer.loss.token_logprobs), which moves its numbers by ~4e-9,
hence 1e-7 there. A different formula differs by > 1e-4 (checked below with token-mean).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl")

from verl import DataProto
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils import tensordict_utils as tu
from verl.utils.seqlen_balancing import prepare_dynamic_batch
from verl.utils.torch_functional import logprobs_from_logits
from verl.workers.config import FSDPActorConfig

from psft.trainer.engine.step import ObjectiveConfig, train_step
from psft.trainer.loss import aggregate
from psft.trainer.verl.psft_trainer import LossSettings, psft_engine_loss

VOCAB, PROMPT = 13, 3
RESPONSES = [3, 40, 7, 25, 60, 2, 15, 33]
"""Response lengths of the 8 demonstrations of one mini-batch: 2 to 60 tokens, so the
normalisations give them very different weights."""
MINI = len(RESPONSES)
CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0)
TOL = 1e-12
NATIVE_TOL = 1e-7
"""The native engine's log-probs are float32 (token_logprobs), the rest float64."""


class TinyLM(torch.nn.Module):
    """A causal LM small enough to compare gradients entry by entry."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        h = torch.tanh(self.mix(h.cumsum(1) / steps))  # token t sees tokens <= t
        return SimpleNamespace(logits=self.head(h))


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().double()


def make_batch() -> dict[str, torch.Tensor]:
    """Right-padded demonstrations in the native layout (labels and loss_mask [N, L-1]),
    with old log-probs that differ from the model's so that ratios vary and some clip."""
    g = torch.Generator().manual_seed(1)
    width = PROMPT + max(RESPONSES)
    ids = torch.zeros(MINI, width, dtype=torch.long)
    attention = torch.zeros(MINI, width, dtype=torch.long)
    loss_mask = torch.zeros(MINI, width - 1, dtype=torch.float64)
    for i, n in enumerate(RESPONSES):
        ids[i, : PROMPT + n] = torch.randint(1, VOCAB, (PROMPT + n,), generator=g)
        attention[i, : PROMPT + n] = 1
        loss_mask[i, PROMPT - 1 : PROMPT + n - 1] = 1.0  # labels[t] = ids[t + 1]
    labels = ids[:, 1:].clone()
    with torch.no_grad():
        logits = make_model()(ids).logits[:, :-1]
        current = logprobs_from_logits(logits, labels)
    old = current + 0.3 * torch.randn(current.shape, generator=g, dtype=torch.float64)
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "loss_mask": loss_mask,
        "old_log_probs": old,
    }


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def seed_update(batch: dict, ranks: int, max_token_len: int):
    """One mini-batch of the seed's update_policy on `ranks` data-parallel GPUs.

    Returns the objective (ranks' summed micro-batch losses, averaged over ranks), the
    FSDP-averaged gradient and the micro-batches as lists of mini-batch rows."""
    per_gpu = MINI // ranks  # fsdp_workers.py 211
    config = FSDPActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=per_gpu,
        use_dynamic_bsz=True,
        ppo_max_token_len_per_gpu=max_token_len,
        clip_ratio=0.2,
        loss_agg_mode="token-mean",
        rollout_n=1,
        **CLIP,
    )
    policy_loss_fn = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
    objective, rank_grads, micro_rows = 0.0, [], []
    for rank in range(ranks):
        replica = make_model()  # every rank holds the same weights
        rows = list(range(rank * per_gpu, (rank + 1) * per_gpu))
        shard = {k: v[rows] for k, v in batch.items()}
        shard["response_mask"] = shard.pop("loss_mask")
        shard["advantages"] = torch.ones_like(shard["old_log_probs"])
        mini_batch = DataProto.from_dict(tensors=shard)
        micro_batches, indices = prepare_dynamic_batch(mini_batch, max_token_len=max_token_len)
        micro_rows += [[rows[i] for i in idx] for idx in indices]
        for micro_batch in micro_batches:
            data = micro_batch.batch
            response_mask = data["response_mask"]
            loss_scale_factor = response_mask.shape[0] / config.ppo_mini_batch_size
            logits = replica(data["input_ids"], data["attention_mask"]).logits[:, :-1]
            log_prob = logprobs_from_logits(logits, data["labels"])
            pg_loss, _ = policy_loss_fn(
                old_log_prob=data["old_log_probs"],
                log_prob=log_prob,
                advantages=data["advantages"],
                response_mask=response_mask,
                loss_agg_mode=config.loss_agg_mode,
                config=config,
            )
            loss = pg_loss * loss_scale_factor
            loss.backward()
            objective += float(loss.detach()) / ranks
        rank_grads.append(grads_of(replica))
    averaged = [torch.stack(g).mean(0) for g in zip(*rank_grads, strict=True)]
    return objective, averaged, micro_rows


class Recorder(torch.optim.SGD):
    """An optimizer that keeps the gradient it is asked to apply and applies nothing."""

    def __init__(self, params):
        self.params = list(params)
        super().__init__(self.params, lr=0.0)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        self.seen = [p.grad.detach().clone() for p in self.params]


def native_update(batch: dict, micro_rows: list[list[int]], mode: str):
    """The native engine's train_step over the same micro-batches as one mini-batch."""
    model = make_model()
    micros = [
        {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels", "loss_mask")}
        for rows in micro_rows
    ]
    old = [[(batch["old_log_probs"][rows], torch.zeros(len(rows), 1)) for rows in micro_rows]]
    optimizer = Recorder(model.parameters())
    config = ObjectiveConfig(objective="psft", loss_agg_mode=mode, grad_clip=1e30, **CLIP)
    result = train_step(model, optimizer, [micros], config, old=old)
    return result.loss, optimizer.seen


def verl_engine_update(batch: dict, micro_rows: list[list[int]], ranks: int, mode: str):
    """Our verl engine's loss (psft_engine_loss) per rank and micro-batch, in verl's layout
    (log_probs[t] scores token t + 1, loss_mask over tokens); gradients averaged over ranks."""
    per_gpu = MINI // ranks
    settings = LossSettings(objective="psft", loss_agg_mode=mode, **CLIP)
    objective, rank_grads = 0.0, []
    for rank in range(ranks):
        replica = make_model()
        mine = [rows for rows in micro_rows if rows[0] // per_gpu == rank]
        for rows in mine:
            logits = replica(batch["input_ids"][rows]).logits[:, :-1]
            log_probs = logprobs_from_logits(logits, batch["labels"][rows])
            data = tu.get_tensordict(
                tensor_dict={
                    "old_log_probs": torch.nn.functional.pad(batch["old_log_probs"][rows], (0, 1)),
                    "loss_mask": torch.nn.functional.pad(batch["loss_mask"][rows], (1, 0)),
                },
                non_tensor_dict={
                    "dp_size": ranks,
                    "batch_num_tokens": int(batch["loss_mask"].sum()),
                    "psft_mini_batch_seqs": MINI,
                },
            )
            output = {"log_probs": torch.nn.functional.pad(log_probs, (0, 1))}
            loss, _ = psft_engine_loss(settings, output, data)
            loss.backward()
            objective += float(loss.detach()) / ranks
        rank_grads.append(grads_of(replica))
    return objective, [torch.stack(g).mean(0) for g in zip(*rank_grads, strict=True)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("ranks", "max_token_len"),
    [
        (1, 1000),  # the whole mini-batch in one micro-batch
        (1, 70),  # one GPU, dynamic micro-batches of 1 to 3 sequences
        (2, 70),
        (4, 80),
        (8, 70),  # the seed: 8 GPUs, mini-batch 8, one demonstration per GPU
    ],
)
def test_micro_token_mean_is_the_seeds_dynamic_bsz_update(ranks, max_token_len, capsys):
    batch = make_batch()
    seed_loss, seed_grads, micro_rows = seed_update(batch, ranks, max_token_len)
    assert sorted(r for rows in micro_rows for r in rows) == list(range(MINI))

    native_loss, native_grads = native_update(batch, micro_rows, "micro-token-mean")
    engine_loss, engine_grads = verl_engine_update(batch, micro_rows, ranks, "micro-token-mean")
    diffs = {
        "native loss": abs(native_loss - seed_loss),
        "native grad": max_diff(native_grads, seed_grads),
        "verl-engine loss": abs(engine_loss - seed_loss),
        "verl-engine grad": max_diff(engine_grads, seed_grads),
    }
    with capsys.disabled():
        sizes = sorted(len(rows) for rows in micro_rows)
        print(f"\nranks={ranks} micro-batch sizes={sizes} loss={seed_loss:.6f} max abs diff:")
        print("  " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert diffs["native loss"] < NATIVE_TOL and diffs["native grad"] < NATIVE_TOL, diffs
    assert diffs["verl-engine loss"] < TOL and diffs["verl-engine grad"] < TOL, diffs

    # the comparison can tell the modes apart: token-mean over the mini-batch differs
    # unless the whole mini-batch is one micro-batch
    _, token_grads = native_update(batch, micro_rows, "token-mean")
    if len(micro_rows) == 1:
        assert max_diff(token_grads, seed_grads) < NATIVE_TOL
    else:
        assert max_diff(token_grads, seed_grads) > 1e-4


def test_one_demonstration_per_micro_batch_is_seq_mean_token_mean():
    """The seed's run (8 GPUs, mini-batch 8): its effective objective is
    seq-mean-token-mean, whichever way it is computed."""
    batch = make_batch()
    one_each = [[i] for i in range(MINI)]
    micro_loss, micro_grads = native_update(batch, one_each, "micro-token-mean")
    seq_loss, seq_grads = native_update(batch, one_each, "seq-mean-token-mean")
    whole_loss, whole_grads = native_update(batch, [list(range(MINI))], "seq-mean-token-mean")
    seed_loss, seed_grads, _ = seed_update(batch, ranks=MINI, max_token_len=1000)
    for loss, grads in ((seq_loss, seq_grads), (whole_loss, whole_grads)):
        assert abs(loss - micro_loss) < TOL
        assert max_diff(grads, micro_grads) < TOL
    assert abs(seed_loss - micro_loss) < NATIVE_TOL
    assert max_diff(seed_grads, micro_grads) < NATIVE_TOL

    # and verl 0.9.1's own seq-mean-token-mean over the whole mini-batch agrees (it divides
    # each sequence by its token count + 1e-8: relative 1e-8 at most)
    from verl.trainer.ppo.core_algos import agg_loss

    g = torch.Generator().manual_seed(2)
    loss_tok = torch.rand(MINI, 9, dtype=torch.float64, generator=g)
    mask = (torch.rand(MINI, 9, generator=g) > 0.4).double()
    mask[:, 0] = 1.0
    parts = [
        aggregate(loss_tok[i : i + 1], mask[i : i + 1], "micro-token-mean", MINI)
        for i in range(MINI)
    ]
    ours = sum(parts)
    theirs = agg_loss(loss_tok, mask, "seq-mean-token-mean")
    assert float(ours) == pytest.approx(float(theirs), rel=1e-8, abs=0)
