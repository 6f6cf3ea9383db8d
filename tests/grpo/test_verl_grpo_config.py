"""verl GRPO (GPU clusters): spec mapping, verl's own validation, reward, prompt rows.

The run itself needs CUDA GPUs and vLLM and is not exercised here."""

from __future__ import annotations

import pytest

from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJob

pytest.importorskip("verl")

from psft.trainer.grpo import verl_backend
from psft.trainer.grpo.prompts import PromptRow

INPUTS = {
    "model_path": "/run/train/final",
    "prompts_file": "/run/grpo/prompts.parquet",
    "checkpoint_dir": "/run/grpo/checkpoints",
    "n_gpus_per_node": 8,
}


def make_job(**grpo) -> PSFTJob:
    return PSFTJob.model_validate(
        {
            "metadata": {"name": "g"},
            "spec": {
                "model": {"source": "m"},
                "dataset": {"train": ["t.jsonl"], "maxPromptLength": 300},
                "psft": {"microBatchSize": 3, "seed": 9, "lossAggMode": "token-mean"},
                "grpo": {
                    "enabled": True,
                    "prompts": ["p.jsonl"],
                    "rolloutN": 6,
                    "batchSize": 16,
                    "miniBatchSize": 4,
                    "steps": 40,
                    "learningRate": 2e-6,
                    "klCoef": 0.01,
                    "useKlLoss": True,
                    "clipRatioLow": 0.2,
                    "clipRatioHigh": 0.28,
                    "temperature": 0.8,
                    "maxResponseLength": 1024,
                    **grpo,
                },
                "resources": {"gpusPerNode": 8, "nodes": 2},
            },
        }
    )


EXPECTED = {
    "algorithm.adv_estimator": "grpo",
    "actor_rollout_ref.rollout.n": 6,
    "actor_rollout_ref.rollout.name": "vllm",
    "actor_rollout_ref.rollout.temperature": 0.8,
    "actor_rollout_ref.actor.use_kl_loss": True,
    "actor_rollout_ref.actor.kl_loss_coef": 0.01,
    "actor_rollout_ref.actor.clip_ratio_low": 0.2,
    "actor_rollout_ref.actor.clip_ratio_high": 0.28,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 4,
    "actor_rollout_ref.actor.optim.lr": 2e-6,
    "actor_rollout_ref.model.path": "/run/train/final",
    "data.train_batch_size": 16,
    "data.max_prompt_length": 300,
    "data.max_response_length": 1024,
    "data.train_files": ["/run/grpo/prompts.parquet"],
    "trainer.total_training_steps": 40,
    "trainer.nnodes": 2,
    "trainer.n_gpus_per_node": 8,
    "reward.custom_reward_function.name": "compute_score",
}


@pytest.fixture(scope="module")
def config():
    return verl_backend.build_grpo_config(make_job(), **INPUTS)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_mapping_lands_in_verls_config(config, key):
    from omegaconf import OmegaConf

    value = OmegaConf.select(config, key)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_object(value)
    assert value == EXPECTED[key]


def test_every_key_exists_in_verls_ppo_config():
    settings = verl_backend.grpo_settings(make_job(), **INPUTS)
    assert verl_backend.unknown_keys(verl_backend.base_ppo_config(), settings) == []
    typo = [*settings[:1], verl_backend.Setting("algorithm.adv_estimatr", "grpo", "x")]
    assert [s.key for s in verl_backend.unknown_keys(verl_backend.base_ppo_config(), typo)] == [
        "algorithm.adv_estimatr"
    ]


def test_verl_rejection_names_our_field():
    # 16 prompts per step cannot be split into mini-batches of 32: verl refuses
    blamed = r"^spec\.grpo\.batchSize, spec\.grpo\.miniBatchSize: verl rejected"
    with pytest.raises(UserError, match=blamed):
        verl_backend.build_grpo_config(make_job(miniBatchSize=32, batchSize=16), **INPUTS)


def test_reward_and_prompt_rows(tmp_path):
    import pyarrow.parquet as pq

    assert verl_backend.compute_score("psft", "so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert verl_backend.compute_score("psft", "so \\boxed{3}", "0.5") == 0.0
    rows = [PromptRow([{"role": "user", "content": "1+1?"}], "2", "p.jsonl row 0")]
    out = pq.read_table(verl_backend.write_prompts(rows, tmp_path / "p.parquet", 3.0))
    (row,) = out.to_pylist()
    assert row["prompt"] == [{"role": "user", "content": "1+1?"}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "2"}
    assert row["extra_info"]["grading_timeout"] == 3.0


def test_verl_metric_lines_become_our_records(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text(
        '{"step": 1, "data": {"critic/rewards/mean": 0.25, "critic/score/mean": 0.25, '
        '"actor/entropy": 1.5, "response_length/mean": 100.0, "actor/pg_clipfrac": 0.01}}\n'
    )
    (record,) = verl_backend.to_records(log, 40)
    assert record == {
        "step": 1,
        "total_steps": 40,
        "reward_mean": 0.25,
        "accuracy": 0.25,
        "entropy": 1.5,
        "response_length": 100.0,
        "clip_fraction": 0.01,
    }
