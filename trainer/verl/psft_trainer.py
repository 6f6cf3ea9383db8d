"""PSFT on verl's engine-based SFT trainer (no rollout engine).

Per global batch (`data.train_batch_size` demonstrations):
1. one no-grad, eval-mode forward through verl's engine (`infer_batch`) records the old
   log-probs and the entropy of the current policy on the response tokens of every
   mini-batch, the first included (the native engine does the same whenever a train-mode
   forward could differ, see psft.trainer.engine.step.train_eval_differ);
2. `TrainingWorker.train_mini_batch` then runs batchSize/miniBatchSize optimizer updates
   in order, each with the PSFT loss of `psft.trainer.loss` (the same function the native
   engine calls), normalised over the whole mini-batch so micro-batches add up exactly
   (`micro-token-mean`: each micro-batch's token mean weighted by its share of the
   mini-batch's sequences, as the seed's verl did; docs/loss-normalisation.md).

The loss is also registered in verl's policy-loss registry as `psft`, so verl's PPO/GRPO
actor can use it (`actor_rollout_ref.actor.policy_loss.loss_mode=psft`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import pandas as pd
import torch
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.trainer.sft_trainer import SFTTrainer
from verl.utils import tensordict_utils as tu

from psft.trainer.loss import SEQUENCE_COUNTED_MODES, AggMode, PolicyStats, policy_loss, sft_loss

STAT_KEYS = ("tokens", "clipped", "ratio_sum", "ratio_max", "kl_sum")


@dataclass(frozen=True)
class LossSettings:
    objective: str = "psft"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    loss_agg_mode: AggMode = "token-mean"

    @classmethod
    def from_config(cls, section: Any) -> LossSettings:
        return cls(
            objective=str(section.objective),
            clip_ratio_low=float(section.clip_ratio_low),
            clip_ratio_high=float(section.clip_ratio_high),
            clip_ratio_c=float(section.clip_ratio_c),
            loss_agg_mode=str(section.loss_agg_mode),  # type: ignore[arg-type]
        )


def _padded(nested: torch.Tensor) -> torch.Tensor:
    """[B, j] jagged -> [B, T] right-padded with zeros (sequence by sequence, so views
    sliced out of a larger nested batch keep their own lengths)."""
    if not nested.is_nested:
        return nested
    rows = list(nested.unbind())
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)


def shifted_response_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """verl's log_probs[t] scores token t+1, so the mask moves one to the left per row.

    The wrapped-around last column takes the first token's mask, which is a prompt token
    (0): sequences always start with a prompt.
    """
    return torch.roll(_padded(loss_mask).float(), shifts=-1, dims=-1)


def _denominator(data: TensorDict, mode: AggMode) -> float:
    """What this rank's micro-batch losses are divided by. verl's engine sums the
    micro-batch losses of a rank and FSDP averages gradients over the `dp_size` ranks, so a
    count over the whole mini-batch (all ranks) is divided by dp_size: the ranks' gradients
    then average to the gradient of the mini-batch loss of psft.trainer.loss.aggregate."""
    dp_size = int(data["dp_size"])
    if mode in SEQUENCE_COUNTED_MODES:
        return float(tu.get_non_tensor_data(data, "psft_mini_batch_seqs", None)) / dp_size
    return float(data["batch_num_tokens"]) / dp_size


def psft_engine_loss(
    settings: LossSettings, model_output: dict, data: TensorDict, dp_group: Any = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl engine loss function for one micro-batch of a mini-batch update."""
    logp = _padded(model_output["log_probs"])
    old_logp = _padded(data["old_log_probs"]).to(logp.dtype)
    mask = shifted_response_mask(data["loss_mask"]).to(logp.device)
    denominator = _denominator(data, settings.loss_agg_mode)
    if settings.objective == "sft":
        out = sft_loss(
            logp, mask, agg_mode=settings.loss_agg_mode, denominator=denominator, old_logp=old_logp
        )
    else:
        out = policy_loss(
            logp,
            old_logp,
            1.0,
            mask,
            clip_low=settings.clip_ratio_low,
            clip_high=settings.clip_ratio_high,
            clip_c=settings.clip_ratio_c,
            agg_mode=settings.loss_agg_mode,
            denominator=denominator,
        )
    stats = out.stats
    metrics = {f"psft/{k}": float(getattr(stats, k)) for k in STAT_KEYS}
    with torch.no_grad():
        metrics["psft/nll_sum"] = float(-(logp.detach() * mask).sum())
    return out.loss, metrics


@register_policy_loss("psft")
def compute_policy_loss_psft(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy-loss registry entry: psft.trainer.loss.policy_loss with verl's
    global-batch normalisation (`config.global_batch_info`) and verl's metric names."""
    if rollout_is_weights is not None:
        raise ValueError("policy loss 'psft' does not support rollout importance weights")
    info = dict(getattr(config, "global_batch_info", None) or {})
    dp_size = int(info.get("dp_size") or 1)
    denominator = None
    if loss_agg_mode in SEQUENCE_COUNTED_MODES:
        if info.get("global_batch_size") is not None:
            denominator = float(info["global_batch_size"]) / dp_size
    elif info.get("batch_num_tokens") is not None:
        denominator = float(info["batch_num_tokens"]) / dp_size
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    out = policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        clip_low=float(clip_low),
        clip_high=float(clip_high),
        clip_c=float(config.get("clip_ratio_c", 3.0)),
        agg_mode=loss_agg_mode,  # type: ignore[arg-type]
        denominator=denominator,
    )
    means = out.stats.means()
    return out.loss, {
        "actor/pg_clipfrac": means["clip_fraction"],
        "actor/ppo_kl": means["approx_kl"],
        "actor/ratio_mean": means["ratio_mean"],
    }


class PreTokenizedDataset(torch.utils.data.Dataset):
    """Rows tokenized once by the prepare stage: `input_ids` and `loss_mask` (1 on response
    tokens). Both engines train on exactly these ids; verl's collator nests them."""

    def __init__(self, parquet_files, tokenizer, config, processor=None, max_samples: int = -1):
        files = [parquet_files] if isinstance(parquet_files, str) else list(parquet_files)
        frame = pd.concat([pd.read_parquet(f, columns=["input_ids", "loss_mask"]) for f in files])
        if max_samples and max_samples > 0:
            frame = frame.iloc[:max_samples]
        self.input_ids = [torch.as_tensor(list(v), dtype=torch.long) for v in frame["input_ids"]]
        self.loss_mask = [torch.as_tensor(list(v), dtype=torch.long) for v in frame["loss_mask"]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {
            "input_ids": ids,
            "position_ids": torch.arange(ids.shape[0], dtype=torch.long),
            "loss_mask": self.loss_mask[index],
        }


def dispatch_order(batch: int, mini: int, world: int) -> list[int]:
    """Row order of a global batch for `world` data-parallel ranks.

    verl cuts the batch into `world` consecutive chunks (rank r gets chunk r) and each
    rank then takes consecutive mini-batches of mini/world rows. Rank r's k-th mini-batch
    must be rows [k*mini + r*mini/world, k*mini + (r+1)*mini/world) of the one-process
    run, so that the k-th update sees the same rows."""
    per_rank = mini // world
    return [
        k * mini + r * per_rank + i
        for r in range(world)
        for k in range(batch // mini)
        for i in range(per_rank)
    ]


class EpochOrderSampler(torch.utils.data.Sampler[int]):
    """The native engine's row order (psft.trainer.engine.loop.epoch_order, each batch
    cut into token-balanced mini-batches when `lengths` are given: psft.balanceBatch),
    split across data-parallel ranks batch by batch (`dispatch_order`: rank r's k-th
    mini-batch is its slice of the one-process run's k-th), so both engines, and any number
    of ranks, update on the same rows."""

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        rank: int,
        world: int,
        lengths: Sequence[int] | None = None,
        updates_per_step: int = 1,
    ):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.mini_batch_size = batch_size // updates_per_step
        self.rank, self.world, self.epoch = rank, world, 0
        self.lengths, self.updates_per_step = lengths, updates_per_step
        self.skip_batches = 0
        """Global batches of the epoch the next iteration leaves out (a resumed run's
        position in its epoch); reset once that iteration starts."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n // self.batch_size) * (self.batch_size // self.world)

    def __iter__(self):
        from psft.trainer.engine.loop import epoch_order

        order = epoch_order(self.n, self.epoch, self.seed, self.shuffle)
        per_rank = self.batch_size // self.world
        first, self.skip_batches = self.skip_batches, 0
        for b in range(first, self.n // self.batch_size):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.lengths is not None and self.updates_per_step > 1:
                from psft.trainer.engine.balance import balanced_order

                sizes = [self.lengths[i] for i in batch]
                batch = [batch[i] for i in balanced_order(sizes, self.updates_per_step)]
            if self.world > 1:
                batch = [
                    batch[i] for i in dispatch_order(len(batch), self.mini_batch_size, self.world)
                ]
            yield from batch[self.rank * per_rank : (self.rank + 1) * per_rank]


def epoch_order_sampler(
    config: Any, dataset: PreTokenizedDataset, batch_size: int, *, rank: int, world: int
) -> EpochOrderSampler:
    """The native engine's order (seed, shuffle, psft.balanceBatch) from the verl config."""
    updates = int(config.data.train_batch_size) // int(config.psft.mini_batch_size)
    lengths = None
    if config.psft.get("balance_batch", False):
        lengths = [len(ids) for ids in dataset.input_ids]
    return EpochOrderSampler(
        len(dataset),
        batch_size=batch_size,
        seed=int(config.trainer.seed),
        shuffle=bool(config.psft.shuffle),
        rank=rank,
        world=world,
        lengths=lengths,
        updates_per_step=updates,
    )


def _flatten(values: Any) -> list[float]:
    if isinstance(values, (list, tuple)):
        return [x for v in values for x in _flatten(v)]
    if isinstance(values, torch.Tensor):
        return [float(x) for x in values.flatten().tolist()]
    if hasattr(values, "value"):  # verl Metric
        return _flatten(values.value)
    return [float(values)]


def _stats_from_metrics(metrics: dict) -> PolicyStats:
    parts = {k: _flatten(metrics.get(f"psft/{k}", [])) for k in STAT_KEYS}
    return PolicyStats(
        tokens=sum(parts["tokens"]),
        clipped=sum(parts["clipped"]),
        ratio_sum=sum(parts["ratio_sum"]),
        ratio_max=max(parts["ratio_max"], default=0.0),
        kl_sum=sum(parts["kl_sum"]),
    )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


StepCallback = Callable[[dict[str, Any]], None]


class PSFTSteps:
    """PSFT steps over verl's `TrainingWorker` API, shared by the one-node trainer (SPMD, a
    `TrainingWorker` in every torchrun process) and the Ray trainer (psft.trainer.verl.
    ray_trainer: a driver holding the whole global batch, a `RayWorkerGroup` of workers).

    Per step: `infer_batch` (old log-probs and entropy of the batch), then
    `train_mini_batch` (batchSize/miniBatchSize updates with `psft_engine_loss`). The
    subclass says how a call's result arrives (`_result`), how this process' partial sums
    become the global ones (`_reduce`), which learning rate the step uses, how the batch is
    laid out over data-parallel ranks (`_dispatch_order`) and how a checkpoint is saved.
    """

    loss_settings: LossSettings
    mini_batch_size: int
    on_step: StepCallback | None
    reports: bool = True
    """Whether this process reports steps (rank 0 in SPMD, the driver on Ray)."""

    def _result(self, output: Any) -> Any:
        return output

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        return sums

    def _learning_rate(self) -> float:
        raise NotImplementedError

    def _dispatch_order(self, data: TensorDict) -> TensorDict:
        return data

    def _save(self, step: int) -> None:
        raise NotImplementedError

    def _meta_info(self) -> dict[str, Any]:
        return {
            "use_remove_padding": self.config.model.use_remove_padding,
            "use_dynamic_bsz": self.config.data.use_dynamic_bsz,
            "max_token_len_per_gpu": self.config.data.max_token_len_per_gpu,
            "micro_batch_size_per_gpu": self.config.data.micro_batch_size_per_gpu,
            "temperature": 1.0,
            "global_batch_size": self.global_batch_size,
            "pad_mode": self.config.data.pad_mode,
            "pad_token_id": self.model_config.tokenizer.pad_token_id,
        }

    def _old_logprobs(self, data: TensorDict) -> float:
        """No-grad forward of the whole batch: stores old_log_probs, returns the entropy
        (token mean over response tokens, all data-parallel ranks)."""
        infer = data.clone()
        tu.assign_non_tensor(infer, compute_loss=False, calculate_entropy=True)
        output = self._result(self.training_client.infer_batch(infer))
        log_probs = tu.get(output, "log_probs") if output is not None else None
        if log_probs is None:
            raise RuntimeError("verl returned no log-probs for the old-policy forward")
        data["old_log_probs"] = log_probs.detach()
        entropy = _padded(tu.get(output, "entropy"))
        mask = shifted_response_mask(data["loss_mask"])
        local = self._reduce(torch.stack([(entropy * mask).sum(), mask.sum()]).double())
        return float(local[0] / local[1].clamp(min=1.0))

    def _train_step(self, data: TensorDict) -> dict[str, Any]:
        lr_used = self._learning_rate()
        data = self._dispatch_order(data)
        entropy = self._old_logprobs(data)
        tu.assign_non_tensor(
            data,
            mini_batch_size=self.mini_batch_size,
            epochs=1,
            psft_mini_batch_seqs=self.mini_batch_size,
        )
        output = self._result(self.training_client.train_mini_batch(data))
        metrics = tu.get(output, "metrics") if output is not None else {}
        stats = _stats_from_metrics(metrics)
        nll = sum(_flatten(metrics.get("psft/nll_sum", [])))
        record: dict[str, Any] = {
            "loss": _mean(_flatten(metrics.get("loss", []))),
            "nll": nll / max(stats.tokens, 1.0),
            "entropy": entropy,
            "grad_norm": _mean(_flatten(metrics.get("grad_norm", []))),
            **stats.means(),
            "learning_rate": lr_used,
            "response_tokens": int(stats.tokens),
        }
        return record

    def _validation_batches(self) -> Iterable[TensorDict]:
        for batch in self.val_dataloader or []:
            yield tu.get_tensordict(tensor_dict=batch, non_tensor_dict=self._meta_info())

    def _validate(self) -> dict[str, float]:
        """Held-out NLL and entropy, token means over response tokens (no update)."""
        sums = torch.zeros(3, dtype=torch.float64)
        for data in self._validation_batches():
            tu.assign_non_tensor(data, compute_loss=False, calculate_entropy=True)
            output = self._result(self.training_client.infer_batch(data))
            mask = shifted_response_mask(data["loss_mask"])
            logp = _padded(tu.get(output, "log_probs"))
            entropy = _padded(tu.get(output, "entropy"))
            sums += torch.stack([-(logp * mask).sum(), (entropy * mask).sum(), mask.sum()]).double()
        sums = self._reduce(sums)
        if sums[2] == 0:
            return {}
        return {"val_loss": float(sums[0] / sums[2]), "val_entropy": float(sums[1] / sums[2])}

    tokens_before: int = 0
    """Response tokens of the steps before a resumed run's first (its metrics' last record)."""

    def _position_loader(self, step: int) -> None:
        """Start the data where step `step` left it: the sampler skips the batches of the
        epoch already trained, in a fresh loader. verl's restored loader state is not used:
        saved at the end of an epoch, it would skip the whole next epoch."""
        old = self.train_dataloader
        self.train_sampler.skip_batches = step % self.steps_per_epoch
        self.train_dataloader = type(old)(
            dataset=self.train_dataset,
            batch_size=old.batch_size,
            sampler=self.train_sampler,
            collate_fn=self.collate_fn,
            num_workers=0,
            pin_memory=False,
            drop_last=True,
        )
        self.ckpt_handler.train_dataloader = self.train_dataloader

    def fit(self) -> int:
        """Train to the configured number of steps (as many epochs as that takes, like the
        native engine); returns the last step."""
        step = self.resume_global_step
        save_freq = int(self.config.trainer.save_freq)
        started = time.monotonic()
        response_tokens = self.tokens_before if step else 0
        self._position_loader(step)
        if step == 0 and self.val_dataloader is not None:
            # held-out NLL and entropy of the starting policy, logged as step 0 like the
            # native engine: the point every training curve starts from
            baseline = self._validate()
            if baseline and self.on_step is not None and self.reports:
                total = self.total_training_steps
                self.on_step({"step": 0, "total_steps": total, "epoch": 0, **baseline})
        for epoch in itertools.count(step // self.steps_per_epoch):
            self.train_sampler.set_epoch(epoch)
            for batch in self.train_dataloader:
                step += 1
                t0 = time.monotonic()
                data = tu.get_tensordict(tensor_dict=batch, non_tensor_dict=self._meta_info())
                tokens = int(sum(self._get_batch_seqlens(data)))
                record = self._train_step(data)
                response_tokens += record.pop("response_tokens")
                seconds = time.monotonic() - t0
                last = step >= self.total_training_steps
                saving = last or (save_freq > 0 and step % save_freq == 0)
                if saving and self.val_dataloader is not None:
                    record.update(self._validate())
                record.update(
                    step=step,
                    total_steps=self.total_training_steps,
                    epoch=epoch + 1,
                    tokens=response_tokens,
                    tokens_per_second=tokens / max(seconds, 1e-9),
                    step_seconds=seconds,
                    elapsed_s=round(time.monotonic() - started, 3),
                )
                if self.on_step is not None and self.reports:
                    self.on_step(record)
                if saving:
                    self._save(step)
                if last:
                    return step
        return step  # unreachable: itertools.count never ends


class PSFTTrainer(PSFTSteps, SFTTrainer):
    """verl's SFTTrainer (SPMD, one process per GPU) with PSFT steps.

    `on_step(record)` receives each step's metrics with the names of the native engine
    (loss, entropy, clip_fraction, ratio_mean, ...); `on_checkpoint(step, path)` is called
    after verl saves a checkpoint.
    """

    def __init__(
        self,
        config,
        on_step: StepCallback | None = None,
        on_checkpoint: Callable[[int, str], None] | None = None,
    ):
        self.loss_settings = LossSettings.from_config(config.psft)
        self.mini_batch_size = int(config.psft.mini_batch_size)
        self.on_step = on_step
        self.on_checkpoint = on_checkpoint
        super().__init__(config)
        self.reports = self.rank == 0

    def _build_engine(self) -> None:
        super()._build_engine()
        self.loss_fn = partial(psft_engine_loss, self.loss_settings)
        self.training_client.set_loss_fn(loss_fn=self.loss_fn)

    def _build_dataloader(self) -> None:
        super()._build_dataloader()
        # verl always shuffles with its own seed; use the native engine's order instead
        self.train_sampler = epoch_order_sampler(
            self.config,
            self.train_dataset,
            self.global_batch_size,
            rank=self.engine.get_data_parallel_rank(),
            world=self.engine.get_data_parallel_size(),
        )
        if self.val_dataset is not None:
            # every held-out row counts (verl's loader drops all but whole global batches)
            self.val_dataloader = torch.utils.data.DataLoader(
                self.val_dataset,
                batch_size=int(self.config.data.micro_batch_size_per_gpu),
                sampler=torch.utils.data.DistributedSampler(
                    self.val_dataset,
                    shuffle=False,
                    drop_last=False,
                    num_replicas=self.engine.get_data_parallel_size(),
                    rank=self.engine.get_data_parallel_rank(),
                ),
                collate_fn=self.collate_fn,
                num_workers=0,
            )
        loader_cls = type(self.train_dataloader)
        self.train_dataloader = loader_cls(
            dataset=self.train_dataset,
            batch_size=self.train_batch_size_per_dp,
            sampler=self.train_sampler,
            collate_fn=self.collate_fn,
            num_workers=self.config.data.num_workers,
            pin_memory=False,
            drop_last=True,
        )

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        group = self.engine.get_data_parallel_group()
        if group is not None and self.engine.get_data_parallel_size() > 1:
            torch.distributed.all_reduce(sums, group=group)
        return sums

    def _learning_rate(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def _save(self, step: int) -> None:
        self.ckpt_handler.save_checkpoint(step=step)
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, self.config.trainer.default_local_dir)


def export_hf_model(trainer: SFTTrainer, source_model: str, out_dir: str) -> None:
    """`export_hf` of a one-node trainer's policy."""
    export_hf(
        trainer.engine.module,
        rank=trainer.rank,
        source_model=source_model,
        trust=bool(trainer.config.model.trust_remote_code),
        tokenizer=trainer.model_config.tokenizer,
        out_dir=out_dir,
    )


def export_hf(
    module: torch.nn.Module, *, rank: int, source_model: str, trust: bool, tokenizer, out_dir: str
) -> None:
    """Gather the FSDP-sharded policy into one Hugging Face folder (safetensors) on rank 0,
    in the dtype of the source model's config, with the tokenizer next to it. A collective:
    every rank calls it."""
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    if rank != 0:
        return
    hf_config = AutoConfig.from_pretrained(source_model, trust_remote_code=trust)
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    generation = Path(source_model) / "generation_config.json"
    if generation.exists() and not (out / "generation_config.json").exists():
        (out / "generation_config.json").write_text(generation.read_text())
