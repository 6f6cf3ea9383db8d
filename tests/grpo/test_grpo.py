"""GRPO stage: prompt checks before any rollout, the reward, the TRL mapping, a real run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from psft.workflows import layout
from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJob
from psft.workflows.stages import StageConfig


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_job(prompts: list[str], **grpo) -> PSFTJob:
    return PSFTJob.model_validate(
        {
            "metadata": {"name": "grpojob"},
            "spec": {
                "model": {"source": "unused"},
                "dataset": {"train": ["unused.jsonl"]},
                "grpo": {
                    "enabled": True,
                    "prompts": prompts,
                    "rolloutN": 2,
                    "batchSize": 2,
                    "miniBatchSize": 1,
                    "steps": 2,
                    "maxResponseLength": 12,
                    "learningRate": 1e-3,
                    **grpo,
                },
                "resources": {"device": "cpu"},
                "monitoring": {"metricsPort": 0},
            },
        }
    )


def stage(job: PSFTJob, root: Path) -> StageConfig:
    return StageConfig(stage="grpo", kind="grpo", job=job, run_root=str(root), progress=False)


# prompt sets -----------------------------------------------------------------------------
def test_prompt_rows_get_the_system_prompt(tmp_path):
    from psft.trainer.grpo.prompts import load_prompts

    f = write_prompts(tmp_path / "p.jsonl", [{"problem": "1+1?", "answer": 2}])
    (row,) = load_prompts(make_job([str(f)]), [(str(f), f)])
    assert row.answer == "2"
    assert [m["role"] for m in row.messages] == ["system", "user"]
    assert row.messages[-1]["content"] == "1+1?"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"problem": "1+1?"}, r"spec.grpo.answerKey: .*p.jsonl row 1 has no 'answer' column"),
        ({"problem": "1+1?", "answer": "  "}, r"p.jsonl row 1 has an empty 'answer'"),
        ({"problem": "1+1?", "answer": None}, r"p.jsonl row 1 has an empty 'answer'"),
        ({"answer": "2"}, r"spec.grpo.promptKey: .*row 1 has no prompt in column 'problem'"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, message):
    from psft.trainer.grpo.prompts import load_prompts

    f = write_prompts(tmp_path / "p.jsonl", [{"problem": "ok", "answer": "1"}, row])
    with pytest.raises(UserError, match=message):
        load_prompts(make_job([str(f)]), [(str(f), f)])


def test_prompts_without_answers_fail_before_any_model_or_rollout(tmp_path):
    """No PSFT model exists in this run: the error must still be about the answers."""
    from psft.trainer.grpo.stage import run

    f = write_prompts(tmp_path / "p.jsonl", [{"problem": "1+1?", "solution": "2"}])
    with pytest.raises(UserError, match="has no 'answer' column"):
        run(stage(make_job([str(f)]), tmp_path / "run"))
    assert not (tmp_path / "run" / "grpo").exists()


def test_no_prompt_files(tmp_path):
    from psft.trainer.grpo.stage import run

    with pytest.raises(UserError, match=r"spec\.grpo\.prompts: GRPO is enabled but no prompt"):
        run(stage(make_job([]), tmp_path / "run"))


def test_missing_psft_model_is_a_clear_error(tmp_path):
    from psft.trainer.grpo.stage import run

    f = write_prompts(tmp_path / "p.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(UserError, match="train/final: no PSFT model to start GRPO from"):
        run(stage(make_job([str(f)]), tmp_path / "run"))


# reward ------------------------------------------------------------------------------------
def test_reward_is_the_math_grader_on_the_last_boxed_answer():
    from psft.trainer.grpo.reward import make_reward_function

    logged = []
    reward = make_reward_function(timeout=5.0)
    completions = [
        [{"role": "assistant", "content": "so \\boxed{3} no wait \\boxed{\\frac{1}{2}}"}],
        "the answer is \\boxed{0.5}",
        "the answer is 0.5",
        "\\boxed{7}",
    ]
    got = reward(
        completions=completions,
        answer=["1/2", "\\frac12", "0.5", "8"],
        log_metric=lambda name, value: logged.append((name, value)),
        prompts=None,
    )
    assert got == [1.0, 1.0, 0.0, 0.0]
    assert logged == [("accuracy", 0.5)]


# backend choice and mapping ------------------------------------------------------------------
def test_backend_choice():
    from psft.trainer.grpo.stage import choose_backend

    assert choose_backend("auto", cuda=False, vllm=False) == "trl"
    assert choose_backend("auto", cuda=True, vllm=False) == "trl"
    assert choose_backend("auto", cuda=True, vllm=True) == "vllm"
    assert choose_backend("hf", cuda=True, vllm=True) == "trl"
    with pytest.raises(UserError, match=r"spec\.grpo\.rollout: 'vllm' needs a CUDA GPU"):
        choose_backend("vllm", cuda=False, vllm=True)


def test_trl_arguments_field_by_field(tmp_path):
    from psft.trainer.grpo.trl_backend import grpo_arguments

    job = make_job(
        ["p"],
        rolloutN=4,
        batchSize=8,
        miniBatchSize=2,
        steps=5,
        learningRate=3e-6,
        klCoef=0.02,
        clipRatioLow=0.1,
        clipRatioHigh=0.3,
        temperature=0.9,
        maxResponseLength=64,
    )
    job.spec.psft.seed = 11
    job.spec.psft.grad_clip = 0.7
    args = grpo_arguments(job, tmp_path, "cpu")
    expected = {
        "num_generations": 4,  # rolloutN
        "per_device_train_batch_size": 8,  # miniBatchSize prompts x rolloutN
        "steps_per_generation": 4,  # batchSize / miniBatchSize updates per rollout
        "max_steps": 20,  # steps x updates
        "logging_steps": 4,  # one record per GRPO step
        "learning_rate": 3e-6,
        "beta": 0.02,  # klCoef (useKlLoss)
        "epsilon": 0.1,
        "epsilon_high": 0.3,
        "temperature": 0.9,
        "max_completion_length": 64,
        "seed": 11,
        "max_grad_norm": 0.7,
        "use_cpu": True,
        "bf16": False,
        "num_iterations": 1,
        "scale_rewards": "group",
        "loss_type": "dapo",
    }
    assert {k: args[k] for k in expected} == expected
    job.spec.grpo.use_kl_loss = False
    assert grpo_arguments(job, tmp_path, "cpu")["beta"] == 0.0
    from trl import GRPOConfig

    GRPOConfig(**grpo_arguments(job, tmp_path, "cpu"))  # TRL accepts every argument
    job.spec.grpo.mini_batch_size = 3
    with pytest.raises(UserError, match=r"^spec\.grpo\.miniBatchSize: 3 must divide"):
        grpo_arguments(job, tmp_path, "cpu")


# a real run on the tiny model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def grpo_run(tiny_model_dir, tmp_path_factory) -> Path:
    from psft.trainer.grpo.stage import run

    base = tmp_path_factory.mktemp("grpo")
    root = base / "run"
    shutil.copytree(tiny_model_dir, root / layout.final_model("train"))
    f = write_prompts(
        base / "p.jsonl",
        [{"problem": f"What is {i} + 3?", "answer": str(i + 3)} for i in range(6)],
    )
    run(stage(make_job([str(f)]), root))
    return root


def test_run_writes_metrics_per_step(grpo_run):
    lines = (grpo_run / "grpo/metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["total_steps"] == 2
        for key in ("reward_mean", "accuracy", "entropy", "response_length", "learning_rate"):
            assert isinstance(r[key], float), key
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0 < r["response_length"] <= 12
        assert r["entropy"] > 0


def test_run_exports_the_policy(grpo_run):
    from transformers import AutoModelForCausalLM

    final = grpo_run / layout.final_model("grpo")
    assert (final / "model.safetensors").is_file()
    assert not (final / "training_args.bin").exists()
    AutoModelForCausalLM.from_pretrained(final)
    summary = json.loads((grpo_run / layout.stage_summary("grpo")).read_text())
    assert summary == {"backend": "trl", "steps": 2, "prompts": 6, "source": "train/final"}
