"""GRPO on GPU clusters: verl's PPO trainer with `adv_estimator=grpo` and a vLLM rollout.

`grpo_settings` maps the spec to verl's `ppo_trainer` config (pure, tested field by field
and against verl's own config); `compute_score` is the reward verl calls (the evaluation
stage's grader on the last \\boxed{} answer); `write_prompts` turns the prompt set into
verl's RL parquet rows. `train` composes, checks and starts `verl.trainer.main_ppo`, then
merges the last actor checkpoint into a Hugging Face folder. It needs CUDA GPUs and vLLM
(the trainer image); on other machines the stage uses trl_backend.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from psft.trainer.grpo.prompts import PromptRow
from psft.trainer.verl.config import Setting, apply_settings
from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJob

ENGINE_FIELD = "spec.grpo.rollout"
REWARD_MODULE = "pkg://psft.trainer.grpo.verl_backend"
DATA_SOURCE = "psft"

METRIC_NAMES = {
    "critic/rewards/mean": "reward_mean",
    "critic/score/mean": "accuracy",
    "actor/entropy": "entropy",
    "response_length/mean": "response_length",
    "response_length/clip_ratio": "response_clipped_fraction",
    "actor/pg_clipfrac": "clip_fraction",
    "actor/ppo_kl": "approx_kl",
    "actor/kl_loss": "kl_loss",
    "actor/pg_loss": "loss",
    "actor/grad_norm": "grad_norm",
    "actor/lr": "learning_rate",
}
"""verl metric -> our metrics.jsonl key (the TRL backend writes the same keys)."""


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info=None):
    """verl custom reward: 1.0 when the completion's boxed answer matches the reference."""
    from psft.trainer.eval.grading import grade_math

    timeout = float((extra_info or {}).get("grading_timeout", 5.0))
    return 1.0 if grade_math(solution_str, str(ground_truth), timeout=timeout) else 0.0


def write_prompts(rows: list[PromptRow], path: Path, grading_timeout: float) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "data_source": [DATA_SOURCE] * len(rows),
            "prompt": [r.messages for r in rows],
            "reward_model": [{"style": "rule", "ground_truth": r.answer} for r in rows],
            "extra_info": [{"source": r.source, "grading_timeout": grading_timeout} for r in rows],
        }
    )
    pq.write_table(table, path)
    return path


def grpo_settings(
    job: PSFTJob,
    *,
    model_path: str,
    prompts_file: str,
    checkpoint_dir: str,
    n_gpus_per_node: int,
) -> list[Setting]:
    spec = job.spec
    grpo, psft = spec.grpo, spec.psft
    actor = "actor_rollout_ref.actor"
    rollout = "actor_rollout_ref.rollout"
    return [
        Setting("actor_rollout_ref.model.path", model_path, "spec.grpo (starts from train/final)"),
        Setting(
            "actor_rollout_ref.model.trust_remote_code",
            spec.model.trust_remote_code,
            "spec.model.trustRemoteCode",
        ),
        Setting("data.train_files", [prompts_file], "spec.grpo.prompts"),
        Setting("data.val_files", [prompts_file], "spec.grpo.prompts"),
        Setting("data.prompt_key", "prompt", ENGINE_FIELD),
        Setting(
            "data.max_prompt_length", spec.dataset.max_prompt_length, "spec.dataset.maxPromptLength"
        ),
        Setting(
            "data.max_response_length", grpo.max_response_length, "spec.grpo.maxResponseLength"
        ),
        Setting("data.train_batch_size", grpo.batch_size, "spec.grpo.batchSize"),
        Setting("data.seed", psft.seed, "spec.psft.seed"),
        Setting("algorithm.adv_estimator", "grpo", ENGINE_FIELD),
        Setting("algorithm.norm_adv_by_std_in_grpo", True, ENGINE_FIELD),
        Setting("algorithm.use_kl_in_reward", False, "spec.grpo.useKlLoss"),
        Setting(f"{rollout}.n", grpo.rollout_n, "spec.grpo.rolloutN"),
        Setting(f"{rollout}.name", "vllm", ENGINE_FIELD),
        Setting(f"{rollout}.temperature", grpo.temperature, "spec.grpo.temperature"),
        Setting(f"{rollout}.tensor_model_parallel_size", 1, ENGINE_FIELD),
        Setting(
            f"{rollout}.log_prob_micro_batch_size_per_gpu",
            psft.micro_batch_size,
            "spec.psft.microBatchSize",
        ),
        Setting(f"{actor}.ppo_mini_batch_size", grpo.mini_batch_size, "spec.grpo.miniBatchSize"),
        Setting(
            f"{actor}.ppo_micro_batch_size_per_gpu",
            psft.micro_batch_size,
            "spec.psft.microBatchSize",
        ),
        Setting(f"{actor}.use_kl_loss", grpo.use_kl_loss, "spec.grpo.useKlLoss"),
        Setting(f"{actor}.kl_loss_coef", grpo.kl_coef, "spec.grpo.klCoef"),
        Setting(f"{actor}.kl_loss_type", "low_var_kl", ENGINE_FIELD),
        Setting(f"{actor}.clip_ratio_low", grpo.clip_ratio_low, "spec.grpo.clipRatioLow"),
        Setting(f"{actor}.clip_ratio_high", grpo.clip_ratio_high, "spec.grpo.clipRatioHigh"),
        Setting(f"{actor}.clip_ratio_c", psft.clip_ratio_c, "spec.psft.clipRatioC"),
        Setting(f"{actor}.loss_agg_mode", psft.loss_agg_mode, "spec.psft.lossAggMode"),
        Setting(f"{actor}.entropy_coeff", 0.0, ENGINE_FIELD),
        Setting(f"{actor}.optim.lr", grpo.learning_rate, "spec.grpo.learningRate"),
        Setting(f"{actor}.optim.weight_decay", psft.weight_decay, "spec.psft.weightDecay"),
        Setting(f"{actor}.optim.clip_grad", psft.grad_clip, "spec.psft.gradClip"),
        Setting(
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
            psft.micro_batch_size,
            "spec.psft.microBatchSize",
        ),
        Setting("reward.custom_reward_function.path", REWARD_MODULE, ENGINE_FIELD),
        Setting("reward.custom_reward_function.name", "compute_score", ENGINE_FIELD),
        Setting("trainer.total_training_steps", grpo.steps, "spec.grpo.steps"),
        Setting("trainer.total_epochs", max(grpo.steps, 1), "spec.grpo.steps"),
        Setting("trainer.n_gpus_per_node", n_gpus_per_node, "spec.resources.gpusPerNode"),
        Setting("trainer.nnodes", spec.resources.nodes, "spec.resources.nodes"),
        Setting("trainer.logger", ["console", "file"], ENGINE_FIELD),
        Setting("trainer.project_name", "psft", ENGINE_FIELD),
        Setting("trainer.experiment_name", f"{job.metadata.name}-grpo", "metadata.name"),
        Setting("trainer.default_local_dir", checkpoint_dir, ENGINE_FIELD),
        Setting("trainer.save_freq", grpo.steps, "spec.grpo.steps"),
        Setting("trainer.test_freq", -1, ENGINE_FIELD),
        Setting("trainer.val_before_train", False, ENGINE_FIELD),
        Setting("trainer.resume_mode", "auto", ENGINE_FIELD),
    ]


def base_ppo_config() -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from psft.trainer.verl.config import verl_config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
        return compose(config_name="ppo_trainer")


def unknown_keys(config: Any, settings: list[Setting]) -> list[Setting]:
    """Settings whose key verl's ppo_trainer config does not have (a typo or a verl
    version that renamed it): verl would silently ignore them."""
    from omegaconf import OmegaConf

    missing = []
    for s in settings:
        parent_key, _, leaf = s.key.rpartition(".")
        parent = OmegaConf.select(config, parent_key) if parent_key else config
        if parent is None or not OmegaConf.is_dict(parent) or leaf not in parent.keys():  # noqa: SIM118 (`in` is False for ??? values)
            missing.append(s)
    return missing


def build_grpo_config(job: PSFTJob, **inputs: Any) -> Any:
    settings = grpo_settings(job, **inputs)
    base = base_ppo_config()
    unknown = unknown_keys(base, settings)
    if unknown:
        names = ", ".join(f"{s.key} ({s.field})" for s in unknown)
        raise UserError(f"verl's GRPO config has no {names}: installed verl is not 0.9.1?")
    config = apply_settings(base, settings)
    validate(config, settings)
    return config


def validate(config: Any, settings: list[Setting]) -> None:
    """verl's own config validation (what main_ppo runs first), blamed on our fields."""
    from verl.trainer.main_ppo import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    try:
        validate_config(
            config=config,
            use_reference_policy=need_reference_policy(config),
            use_critic=need_critic(config),
        )
        omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    except Exception as exc:
        text = " ".join(str(exc).split())
        fields = []
        for s in settings:  # the settings whose verl key the message names
            leaf = re.escape(s.key.rsplit(".", 1)[-1])
            if re.search(rf"\b{leaf}\b", text) and s.field not in fields:
                fields.append(s.field)
        blamed = ", ".join(fields) or ENGINE_FIELD
        raise UserError(f"{blamed}: verl rejected the GRPO settings: {text[:300]}") from exc


def to_records(verl_jsonl: Path, total: int) -> list[dict[str, Any]]:
    """verl's file-logger lines -> our per-step records."""
    out = []
    for line in verl_jsonl.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        data = entry.get("data", {})
        record: dict[str, Any] = {"step": int(entry["step"]), "total_steps": total}
        for source, name in METRIC_NAMES.items():
            if isinstance(data.get(source), (int, float)):
                record[name] = float(data[source])
        out.append(record)
    return out


def train(
    job: PSFTJob, rows: list[PromptRow], model_dir: Path, out_dir: Path, work_dir: Path
) -> list[dict[str, Any]]:
    """Run verl GRPO; returns the per-step records. Needs CUDA GPUs and vLLM."""
    import torch
    from omegaconf import OmegaConf

    prompts = write_prompts(rows, work_dir / "prompts.parquet", job.spec.eval.grading_timeout)
    checkpoints = work_dir / "checkpoints"
    config = build_grpo_config(
        job,
        model_path=str(model_dir),
        prompts_file=str(prompts),
        checkpoint_dir=str(checkpoints),
        n_gpus_per_node=max(1, min(job.spec.resources.gpus_per_node, torch.cuda.device_count())),
    )
    config_path = work_dir / "verl_grpo.yaml"
    OmegaConf.save(config, config_path)
    metrics = work_dir / "verl_metrics.jsonl"
    env = {**os.environ, "VERL_FILE_LOGGER_PATH": str(metrics), "WANDB_MODE": "disabled"}
    code = (
        "import sys; from omegaconf import OmegaConf\n"
        "from psft.trainer.verl.compat import skip_trl_value_head_patch\n"
        "skip_trl_value_head_patch()\n"
        "from verl.trainer.main_ppo import main\n"
        "main(OmegaConf.load(sys.argv[1]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(config_path)], env=env, check=False)
    if result.returncode != 0:
        raise UserError(f"verl GRPO failed (exit {result.returncode}); config: {config_path}")
    step = (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip()
    merge = [
        sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
        "--local_dir", str(checkpoints / f"global_step_{step}" / "actor"),
        "--target_dir", str(out_dir),
    ]  # fmt: skip
    if subprocess.run(merge, env=env, check=False).returncode != 0:
        raise UserError(f"could not merge verl's GRPO checkpoint into {out_dir}")
    return to_records(metrics, job.spec.grpo.steps)
