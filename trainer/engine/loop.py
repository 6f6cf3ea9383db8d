"""The native training loop of the train stage: data order, steps, metrics, checkpoints."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from psft.trainer.data import Example, check_token_ids, collate, read_examples
from psft.trainer.engine.balance import balanced_order
from psft.trainer.engine.checkpoint import (
    CheckpointError,
    TrainState,
    checkpoint_problem,
    data_fingerprint,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
)
from psft.trainer.engine.optim import build_optimizer, build_scheduler
from psft.trainer.engine.precision import resolve_precision
from psft.trainer.engine.progress import StepProgress
from psft.trainer.engine.step import MicroBatch, ObjectiveConfig, evaluate, train_step
from psft.trainer.storage.base import (
    DiskFull,
    checkpoint_steps,
    disk_full_message,
    is_disk_full,
)
from psft.workflows import layout
from psft.workflows.errors import UserError
from psft.workflows.stages import StageConfig

STAGE = "train"
"""The train stage's name (a spec.compare arm's is `train-<objective>`: Trainer.stage)."""


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Row order of an epoch: a seeded permutation per epoch (identity without shuffle)."""
    order = list(range(n))
    if shuffle:
        random.Random(f"psft-epoch-{seed}-{epoch}").shuffle(order)
    return order


def step_indices(lengths: Sequence[int], step: int, spec: Any, *, shuffle: bool) -> list[int]:
    """Rows of training step `step` (0-based), in mini-batch order: the epoch's seeded
    permutation cut into batches (a last partial batch is dropped), each batch reordered
    into token-balanced mini-batches when psft.balanceBatch is on (engine.balance)."""
    per_epoch = len(lengths) // spec.batch_size
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(len(lengths), epoch, spec.seed, shuffle)
    batch = order[index * spec.batch_size : (index + 1) * spec.batch_size]
    if spec.balance_batch and spec.updates_per_step > 1:
        k = spec.updates_per_step
        batch = [batch[i] for i in balanced_order([lengths[j] for j in batch], k)]
    return batch


def plan_total_steps(n_rows: int, spec: Any) -> tuple[int, int]:
    """(steps per epoch, total steps). A last partial batch of an epoch is dropped."""
    per_epoch = n_rows // spec.batch_size
    if per_epoch == 0:
        raise UserError(
            f"psft.batchSize ({spec.batch_size}) is larger than the {n_rows} prepared training "
            "rows; lower psft.batchSize or add data"
        )
    total = spec.max_steps if spec.max_steps is not None else per_epoch * spec.epochs
    return per_epoch, total


def to_device(batch: dict[str, torch.Tensor], device: str) -> MicroBatch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def token_budget_chunks(items: Sequence[Example], budget: int) -> list[Sequence[Example]]:
    """Consecutive runs of `items` of at most `budget` tokens each (one item at least)."""
    out: list[Sequence[Example]] = []
    start, used = 0, 0
    for i, item in enumerate(items):
        n = len(item.input_ids)
        if i > start and used + n > budget:
            out.append(items[start:i])
            start, used = i, 0
        used += n
    if start < len(items):
        out.append(items[start:])
    return out


def micro_batches(minibatch: Sequence[Example], spec: Any) -> list[Sequence[Example]]:
    """psft.maxTokensPerMicroBatch when set, else microBatchSize demonstrations each."""
    budget = getattr(spec, "max_tokens_per_micro_batch", None)
    if budget:
        return token_budget_chunks(minibatch, budget)
    return chunks(minibatch, spec.micro_batch_size)


def make_minibatches(
    batch: Sequence[Example], spec: Any, pad_id: int, device: str
) -> list[list[MicroBatch]]:
    return [
        [to_device(collate(micro, pad_id), device) for micro in micro_batches(mb, spec)]
        for mb in chunks(batch, spec.mini_batch_size)
    ]


def validation_batches(
    examples: Sequence[Example], size: int, pad_id: int, device: str
) -> list[MicroBatch]:
    return [to_device(collate(c, pad_id), device) for c in chunks(examples, size)]


class Trainer:
    """State of one train-stage process (built by `from_config`, driven by `fit`)."""

    def __init__(self, config: StageConfig, store: Any) -> None:
        from psft.trainer.model import load_model_and_tokenizer, resolve_device, resolve_model

        self.config = config
        self.store = store
        job = config.job
        self.stage = config.stage
        self.spec = config.psft_spec()
        self.objective = ObjectiveConfig.from_spec(self.spec)
        self.device = resolve_device(job.spec.resources.device)

        self.train_rows = read_examples(store.pull(layout.DATA_TRAIN), allow_empty=False)
        self.val_rows = (
            read_examples(store.pull(layout.DATA_VALIDATION))
            if store.exists(layout.DATA_VALIDATION)
            else []
        )
        self.steps_per_epoch, self.total_steps = plan_total_steps(len(self.train_rows), self.spec)
        self.fingerprint = data_fingerprint(self.train_rows)

        self.resume_step = store.latest_checkpoint(self.stage)
        if self.resume_step is not None:
            # every file of the checkpoint is checked before the model loads
            model_dir, resumed = self.verified_checkpoint(self.resume_step)
            if resumed.data_fingerprint != self.fingerprint:
                raise UserError(
                    f"cannot resume {self.stage} from checkpoint step {self.resume_step}: the "
                    "prepared training data changed since it was written; start the run afresh "
                    "(psft run --fresh) or restore the original data"
                )
        else:
            model_dir = resolve_model(job.spec.model.source)
        self.model_dir = model_dir
        random.seed(self.spec.seed)
        torch.manual_seed(self.spec.seed)
        self.precision = resolve_precision(job.spec.model.dtype, self.device)
        self.model, self.tokenizer = load_model_and_tokenizer(
            model_dir,
            device=self.device,
            dtype=self.precision.param_dtype,
            chat_template=job.spec.model.chat_template,
            trust_remote_code=job.spec.model.trust_remote_code,
        )
        vocabulary = int(self.model.get_input_embeddings().num_embeddings)
        check_token_ids(self.train_rows, vocabulary, store.local_path(layout.DATA_TRAIN))
        check_token_ids(self.val_rows, vocabulary, store.local_path(layout.DATA_VALIDATION))
        if self.spec.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.optimizer = build_optimizer(
            self.model.parameters(),
            learning_rate=self.spec.learning_rate,
            weight_decay=self.spec.weight_decay,
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=self.spec.warmup_steps,
            total_steps=self.total_steps,
            schedule=self.spec.lr_scheduler,
        )
        if self.resume_step is not None:
            try:
                self.state = load_checkpoint(model_dir, self.optimizer, self.scheduler, self.device)
            except CheckpointError as exc:
                raise self.unusable_checkpoint(self.resume_step, exc.problem) from exc
        else:
            self.state = TrainState(
                total_steps=self.total_steps,
                data_fingerprint=self.fingerprint,
                objective=self.spec.objective,
            )
        self.state.total_steps = self.total_steps

    # resuming -------------------------------------------------------------------------------
    def verified_checkpoint(self, step: int) -> tuple[Path, TrainState]:
        """(folder, state) of checkpoint `step`, every file checked before any model loads."""
        key = layout.checkpoint(self.stage, step)
        if not self.store.exists(key):
            raise self.unusable_checkpoint(step, f"{self.store.local_path(key)} does not exist")
        folder = self.store.pull(key)
        problem = checkpoint_problem(folder, step)
        if problem:
            raise self.unusable_checkpoint(step, problem)
        return folder, read_train_state(folder)

    def unusable_checkpoint(self, step: int, problem: str) -> CheckpointError:
        """The error for a `latest` marker naming a checkpoint that cannot be resumed from:
        what is wrong, and the complete older checkpoints the marker could name instead."""
        marker = self.store.local_path(layout.latest_marker(self.stage))
        folder = self.store.local_path(layout.checkpoints(self.stage))
        older = (
            sorted(
                (
                    s
                    for s in checkpoint_steps([p.name for p in folder.iterdir() if p.is_dir()])
                    if s < step and checkpoint_problem(folder / f"step-{s}", s) is None
                ),
                reverse=True,
            )
            if folder.is_dir()
            else []
        )
        if older:
            instead = (
                f"step-{older[0]} ({folder / f'step-{older[0]}'}) is complete: write "
                f'{{"step": {older[0]}}} into {marker} to resume from it, or delete the marker '
                "to train this stage from the start"
            )
        else:
            instead = (
                f"no older complete checkpoint is kept: delete {marker} to train this stage "
                "from the start (or restore the checkpoint from a backup)"
            )
        message = (
            f"cannot resume {self.stage} from checkpoint step-{step}, which the `latest` marker "
            f"names: {problem}. Nothing was changed; {instead}"
        )
        return CheckpointError(message, problem)

    # one step -------------------------------------------------------------------------------
    def batch_for(self, step: int) -> list[Example]:
        shuffle = self.config.job.spec.dataset.shuffle
        indices = step_indices(
            [len(r.input_ids) for r in self.train_rows], step, self.spec, shuffle=shuffle
        )
        return [self.train_rows[k] for k in indices]

    def run_step(self) -> dict[str, Any]:
        step = self.state.step
        minibatches = make_minibatches(self.batch_for(step), self.spec, self.pad_id, self.device)
        lr = self.scheduler.get_last_lr()[0]
        with self.precision.autocast():
            result = train_step(self.model, self.optimizer, minibatches, self.objective)
        self.scheduler.step()
        self.state.step = step + 1
        self.state.tokens += result.response_tokens
        record: dict[str, Any] = {
            "step": self.state.step,
            "total_steps": self.total_steps,
            "epoch": step // self.steps_per_epoch + 1,
            **result.metrics(),
            "learning_rate": lr,
            "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
            "tokens": self.state.tokens,
            "step_seconds": result.seconds,
        }
        if result.skipped_updates:
            record["skipped_updates"] = result.skipped_updates
        return record

    def validate(self) -> dict[str, float]:
        if not self.val_rows:
            return {}
        batches = validation_batches(
            self.val_rows, self.spec.micro_batch_size, self.pad_id, self.device
        )
        with self.precision.autocast():
            return evaluate(self.model, batches)

    def baseline_record(self) -> dict[str, Any]:
        """Held-out NLL and entropy of the starting policy, logged as step 0: the point
        every training curve starts from."""
        return {"step": 0, "total_steps": self.total_steps, "epoch": 0, **self.validate()}

    def save(self) -> None:
        step = self.state.step
        folder = self.store.checkpoint_dir(self.stage, step)
        try:
            save_checkpoint(
                folder, self.model, self.tokenizer, self.optimizer, self.scheduler, self.state
            )
            self.store.commit_checkpoint(self.stage, step)
        except BaseException:
            # a checkpoint the marker does not name is incomplete: it only takes space
            try:
                committed = self.store.latest_checkpoint(self.stage) == step
            except UserError:
                committed = False
            if not committed:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    # the loop -------------------------------------------------------------------------------
    def fit(self, *, stop_after: int | None = None) -> dict[str, Any] | None:
        """Train to total_steps; returns the summary (None when stopped by `stop_after`).

        `stop_after` ends the process after that step as if it were interrupted (after the
        step's checkpoint, if one was due): used to test resumption. A full disk ends it with
        DiskFull; the last committed checkpoint stays as it was.
        """
        try:
            return self._fit(stop_after)
        except UserError:
            raise
        except Exception as exc:
            if not is_disk_full(exc, self.store.work_dir):
                raise
            raise DiskFull(self.disk_full_message(exc)) from exc

    def disk_full_message(self, exc: BaseException) -> str:
        try:
            latest = self.store.latest_checkpoint(self.stage)
        except UserError:
            latest = None
        if latest is None:
            then = (
                "no checkpoint was completed yet; free space there (or give the run a larger "
                "volume) and run the stage again: it starts from the beginning"
            )
        else:
            then = (
                f"the last complete checkpoint, step-{latest}, is kept; free space there (or "
                "give the run a larger volume) and run the stage again: it resumes from step "
                f"{latest}"
            )
        doing = f"the {self.stage} stage was writing step {self.state.step}"
        return disk_full_message(exc, self.store.work_dir, doing, then)

    def _fit(self, stop_after: int | None) -> dict[str, Any] | None:
        from transformers.utils import logging as hf_logging

        from psft.trainer.telemetry import Telemetry

        hf_logging.disable_progress_bar()  # ours is the only progress display

        config, spec, store = self.config, self.spec, self.store
        metrics_path = store.local_path(layout.metrics(self.stage))
        began = time.monotonic()
        elapsed_before = self.state.elapsed_s
        with (
            Telemetry(config, metrics_path, store=store) as telemetry,
            StepProgress(self.total_steps, self.state.step, live=config.progress) as progress,
        ):
            telemetry.rewind(self.state.step)
            if self.resume_step is not None:
                progress.message(f"resuming {self.stage} from checkpoint step {self.resume_step}")
            if telemetry.url:
                progress.message(f"metrics: {telemetry.url}")
            if self.state.step == 0 and self.val_rows:
                baseline = self.baseline_record()
                telemetry.log(baseline)
                progress.message(
                    f"step 0 (before training): held-out NLL {baseline['val_loss']:.4f}, "
                    f"entropy {baseline['val_entropy']:.4f}"
                )
            while self.state.step < self.total_steps:
                record = self.run_step()
                last = self.state.step == self.total_steps
                due = spec.save_every > 0 and self.state.step % spec.save_every == 0
                if last or due:
                    record.update(self.validate())
                self.state.elapsed_s = elapsed_before + time.monotonic() - began
                record["elapsed_s"] = round(self.state.elapsed_s, 3)
                self.state.last_record = record
                # the record first: the checkpoint commit uploads metrics.jsonl before its
                # marker, so a resumed run on a fresh machine finds this step's record
                telemetry.log(record)
                if last or due:
                    self.save()
                progress.update(record)
                if stop_after is not None and self.state.step >= stop_after and not last:
                    return None
        return self.finish()

    def finish(self) -> dict[str, Any]:
        store = self.store
        final_key = layout.final_model(self.stage)
        final_dir = store.local_path(final_key)
        # written aside and renamed: a reader (eval) never finds half a final model
        partial = final_dir.with_name(f".{final_dir.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
            self.model.save_pretrained(partial, safe_serialization=True)
            self.tokenizer.save_pretrained(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if final_dir.exists():
            shutil.rmtree(final_dir)
        partial.rename(final_dir)
        store.push(final_key)
        job = self.config.job
        last = self.state.last_record
        summary = {
            "stage": self.stage,
            "objective": self.spec.objective,
            "model": job.spec.model.source,
            "device": self.device,
            "precision": self.precision.describe(),
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "train_rows": len(self.train_rows),
            "validation_rows": len(self.val_rows),
            "tokens": self.state.tokens,
            "wall_time_s": round(self.state.elapsed_s, 3),
            "final": {k: v for k, v in last.items() if isinstance(v, int | float)},
            "final_model": final_key,
            "checkpoint": layout.checkpoint(self.stage, self.state.step),
            "state": {k: v for k, v in asdict(self.state).items() if k != "last_record"},
        }
        path = store.local_path(layout.stage_summary(self.stage))
        path.write_text(json.dumps(summary, indent=2) + "\n")
        store.push(layout.stage_summary(self.stage))
        return summary


def train(config: StageConfig, store: Any, *, stop_after: int | None = None) -> dict | None:
    return Trainer(config, store).fit(stop_after=stop_after)
