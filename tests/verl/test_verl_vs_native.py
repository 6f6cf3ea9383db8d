"""The verl path against the native engine: same tiny model, data, seed; 3 PSFT steps.

Tolerance: both engines run float32 on CPU, see identical token ids and batches, use the
same loss function, LR schedule and AdamW settings. What differs is how the numbers are
computed: verl takes log-probs/entropy from its own kernels on packed logits (and FSDP2
wraps the model), the native engine from chunked logsumexp on padded logits. Such
float32 reorderings move a token mean by ~1e-7 relative (measured: <= 2e-7 over 3 steps),
so 1e-5 relative leaves two orders of magnitude of headroom while a real divergence (one
update more or less, a wrong mask shift, a different batch: >= 1e-3) still fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from psft.workflows.spec import PSFTJob
from psft.workflows.stages import StageConfig

pytest.importorskip("verl")

REL_TOL = 1e-5
STEPS = 3
COMPARED = (
    "loss",
    "entropy",
    "nll",
    "ratio_mean",
    "ratio_max",
    "approx_kl",
    "clip_fraction",
    "grad_norm",
    "learning_rate",
)


def write_data(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        a, b = i, i % 5
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "demonstration": f"We add the numbers: {a} + {b} = {a + b}. "
                f"The answer is \\boxed{{{a + b}}}.",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_job(
    model: Path, data: Path, engine: str, *, steps: int = STEPS, loss_agg_mode: str = "token-mean"
) -> PSFTJob:
    return PSFTJob.model_validate(
        {
            "metadata": {"name": "cross"},
            "spec": {
                "model": {"source": str(model)},
                "dataset": {
                    "train": [str(data)],
                    "maxPromptLength": 128,
                    "maxResponseLength": 128,
                    "validation": {"fraction": 0.25},
                },
                "psft": {
                    "engine": engine,
                    "batchSize": 8,
                    "miniBatchSize": 4,
                    "microBatchSize": 2,
                    "maxSteps": steps,
                    "lossAggMode": loss_agg_mode,
                    "learningRate": 1e-3,
                    "warmupSteps": 2,
                    "seed": 3,
                },
                "resources": {"device": "cpu"},
                "monitoring": {"metricsPort": 0},
            },
        }
    )


def stage(job: PSFTJob, kind: str, root: Path) -> StageConfig:
    return StageConfig(stage=kind, kind=kind, job=job, run_root=str(root), progress=False)


def run_both(model: Path, base: Path, **job_options) -> dict[str, Path]:
    from psft.trainer import prepare, train

    data = write_data(base / "train.jsonl")
    roots = {}
    for engine in ("native", "verl"):
        root = base / engine
        job = make_job(model, data, engine, **job_options)
        if not roots:
            prepare.run(stage(job, "prepare", root))
        else:  # the very same prepared rows
            shutil.copytree(next(iter(roots.values())) / "data", root / "data")
        train.run(stage(job, "train", root))
        roots[engine] = root
    return roots


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return run_both(tiny_model_dir, tmp_path_factory.mktemp("verl-cross"))


@pytest.fixture(scope="module")
def micro_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The seed's normalisation (docs/loss-normalisation.md): 2 micro-batches of 2 per
    mini-batch in both engines, each weighted by its token mean."""
    base = tmp_path_factory.mktemp("verl-cross-micro")
    return run_both(tiny_model_dir, base, steps=2, loss_agg_mode="micro-token-mean")


def all_records(root: Path) -> list[dict]:
    lines = (root / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def records(root: Path) -> list[dict]:
    """The training steps' records (step 0 is the held-out baseline before training)."""
    return [r for r in all_records(root) if r["step"] > 0]


def test_both_log_the_same_baseline_before_training(runs):
    native, verl = all_records(runs["native"])[0], all_records(runs["verl"])[0]
    assert native["step"] == verl["step"] == 0
    assert set(native) == set(verl)
    for key in ("val_loss", "val_entropy"):
        assert verl[key] == pytest.approx(native[key], rel=REL_TOL)


def test_same_steps_and_record_keys(runs):
    native, verl = records(runs["native"]), records(runs["verl"])
    assert [r["step"] for r in native] == [r["step"] for r in verl] == [1, 2, 3]
    for a, b in zip(native, verl, strict=True):
        assert set(a) == set(b)


@pytest.mark.parametrize("key", COMPARED)
def test_per_step_values_agree(runs, key):
    native, verl = records(runs["native"]), records(runs["verl"])
    for a, b in zip(native, verl, strict=True):
        assert b[key] == pytest.approx(a[key], rel=REL_TOL, abs=1e-9), (a["step"], key)


def test_training_moved_the_policy(runs):
    # the comparison is not between two runs that did nothing
    steps = records(runs["verl"])
    assert steps[-1]["nll"] < steps[0]["nll"] - 0.05
    assert steps[-1]["ratio_max"] > 1.0
    assert "val_loss" in steps[-1] and "val_entropy" in steps[-1]
    assert steps[-1]["val_loss"] == pytest.approx(
        records(runs["native"])[-1]["val_loss"], rel=REL_TOL
    )


def test_exported_models_match(runs):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    native = load_file(runs["native"] / "train/final/model.safetensors")
    verl = load_file(runs["verl"] / "train/final/model.safetensors")
    assert sorted(native) == sorted(verl)
    for name, tensor in native.items():
        torch.testing.assert_close(verl[name], tensor, rtol=1e-4, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(runs["verl"] / "train/final")
    assert model.config.vocab_size == native["model.embed_tokens.weight"].shape[0]
    assert (runs["verl"] / "train/final/tokenizer.json").is_file()


def test_summary(runs):
    summary = json.loads((runs["verl"] / "train/summary.json").read_text())
    native = json.loads((runs["native"] / "train/summary.json").read_text())
    assert summary["engine"] == "verl"
    assert summary["steps"] == native["steps"] == STEPS
    assert summary["tokens"] == native["tokens"]
    assert summary["final_model"] == native["final_model"] == "train/final"


def test_no_rollout_engine_in_the_verl_config(runs):
    import yaml

    config = yaml.safe_load((runs["verl"] / "train/verl/verl.yaml").read_text())
    assert "rollout" not in config and "actor_rollout_ref" not in config
    assert config["engine"]["strategy"] == "fsdp2"
    assert config["psft"]["mini_batch_size"] == 4


def test_micro_token_mean_agrees_across_engines(micro_runs, runs):
    native, verl = records(micro_runs["native"]), records(micro_runs["verl"])
    assert [r["step"] for r in native] == [r["step"] for r in verl] == [1, 2]
    for a, b in zip(native, verl, strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=REL_TOL, abs=1e-9), (a["step"], key)
    # the mode reached both engines: token-mean on the same batches gives another gradient
    # (these demonstrations differ little in length: 9e-5 relative, against engine
    # differences of <= 2e-7)
    token_mean = records(runs["native"])[0]["grad_norm"]
    assert abs(native[0]["grad_norm"] - token_mean) > 1e-5 * token_mean


def test_a_restarted_run_resumes_from_verls_checkpoint(runs, tiny_model_dir):
    """Runs last: asks the finished verl run for one more step. It must resume from the
    step-3 checkpoint in the run's storage (not start over) and log step 4 only once."""
    from psft.trainer import train

    root = runs["verl"]
    job = make_job(tiny_model_dir, root.parent / "train.jsonl", "verl")
    job.spec.psft.max_steps = STEPS + 1
    before = all_records(root)
    train.run(stage(job, "train", root))
    after = all_records(root)
    assert [r["step"] for r in after] == [0, 1, 2, 3, 4]
    assert after[:4] == before
    assert (root / "train/verl/checkpoints/global_step_4").is_dir()
