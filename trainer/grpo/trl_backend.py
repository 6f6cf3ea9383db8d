"""GRPO on one machine with TRL's GRPOTrainer (transformers generation, CPU or one GPU).

verl 0.9.1's PPO/GRPO trainer only drives server rollouts (vLLM, SGLang, TRT-LLM: GPU
only; its HFRollout class is not wired into the trainer), so on a machine without vLLM the
stage uses TRL, with the spec mapped to the same algorithm: group-normalised advantages
(`scale_rewards="group"`, verl's norm_adv_by_std_in_grpo), asymmetric clip
(epsilon/epsilon_high = clipRatioLow/High), token-mean loss (`loss_type="dapo"`, verl's
token-mean), KL to the reference as a loss term (beta = klCoef when useKlLoss).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psft.trainer.grpo.prompts import PromptRow
from psft.trainer.grpo.reward import make_reward_function
from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJob

METRIC_NAMES = {
    "reward": "reward_mean",
    "reward_std": "reward_std",
    "accuracy": "accuracy",
    "entropy": "entropy",
    "completions/mean_length": "response_length",
    "completions/clipped_ratio": "response_clipped_fraction",
    "kl": "approx_kl",
    "clip_ratio/region_mean": "clip_fraction",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
}
"""TRL log key -> our metrics.jsonl key (same names as the train stage where they exist)."""


def updates_per_step(job: PSFTJob) -> int:
    grpo = job.spec.grpo
    return max(grpo.batch_size // grpo.mini_batch_size, 1)


def grpo_arguments(job: PSFTJob, output_dir: Path, device: str) -> dict[str, Any]:
    """GRPOConfig keyword arguments for the spec (pure; tested field by field).

    One GRPO step = generate rolloutN completions for batchSize prompts, then
    batchSize/miniBatchSize optimizer updates of miniBatchSize prompts' completions.
    """
    grpo = job.spec.grpo
    if grpo.batch_size % grpo.mini_batch_size:
        raise UserError(
            f"spec.grpo.miniBatchSize: {grpo.mini_batch_size} must divide "
            f"spec.grpo.batchSize ({grpo.batch_size})"
        )
    updates = updates_per_step(job)
    return {
        "output_dir": str(output_dir),
        "num_generations": grpo.rollout_n,
        "per_device_train_batch_size": grpo.mini_batch_size * grpo.rollout_n,
        "steps_per_generation": updates,
        "num_iterations": 1,
        "max_steps": grpo.steps * updates,
        "logging_steps": updates,
        "learning_rate": grpo.learning_rate,
        "lr_scheduler_type": "constant",
        "beta": grpo.kl_coef if grpo.use_kl_loss else 0.0,
        "epsilon": grpo.clip_ratio_low,
        "epsilon_high": grpo.clip_ratio_high,
        "temperature": grpo.temperature,
        "max_completion_length": grpo.max_response_length,
        "loss_type": "dapo",
        "scale_rewards": "group",
        "seed": job.spec.psft.seed,
        "max_grad_norm": job.spec.psft.grad_clip,
        "use_cpu": device == "cpu",
        "bf16": device != "cpu" and job.spec.model.dtype in ("auto", "bfloat16"),
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "log_completions": False,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "shuffle_dataset": True,
    }


def to_record(logs: dict[str, Any], step: int, total: int, started: float) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "total_steps": total}
    for source, name in METRIC_NAMES.items():
        value = logs.get(source)
        if isinstance(value, (int, float)) and not math.isnan(float(value)):
            record[name] = float(value)
    record["elapsed_s"] = time.monotonic() - started
    return record


def train(
    job: PSFTJob,
    rows: list[PromptRow],
    model_dir: Path,
    out_dir: Path,
    work_dir: Path,
    device: str,
    log: Callable[[dict[str, Any]], None],
) -> int:
    """Run GRPO from `model_dir`; the final policy goes to `out_dir`. Returns steps run."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from psft.trainer.model import load_model_and_tokenizer, resolve_dtype

    spec = job.spec
    dtype = resolve_dtype(spec.model.dtype, device)
    model, tokenizer = load_model_and_tokenizer(
        model_dir,
        device=device,
        dtype=dtype,
        chat_template=spec.model.chat_template,
        trust_remote_code=spec.model.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([{"prompt": r.messages, "answer": r.answer} for r in rows])
    args = GRPOConfig(**grpo_arguments(job, work_dir, device))
    updates = updates_per_step(job)
    total = spec.grpo.steps
    started = time.monotonic()

    class _Metrics(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_kw):
            if logs and "reward" in logs:
                step = max(1, math.ceil(state.global_step / updates))
                log(to_record(logs, step, total, started))

    torch.manual_seed(spec.psft.seed)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[make_reward_function(spec.eval.grading_timeout)],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_Metrics()],
    )
    trainer.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; not part of the model
    return math.ceil(trainer.state.global_step / updates)
