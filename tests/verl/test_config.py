"""PSFTJob -> verl config: every mapped field, verl's own validation, blame on our field."""

from __future__ import annotations

import pytest

from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJob

pytest.importorskip("verl")

from psft.trainer.verl.config import (
    ENGINE_FIELD,
    Setting,
    VerlInputs,
    apply_settings,
    base_config,
    build_config,
    check_config,
    verl_settings,
)

INPUTS = VerlInputs(
    model_path="/models/m",
    train_files=["/run/train.parquet"],
    val_files=["/run/val.parquet"],
    checkpoint_dir="/run/ckpt",
    device="cuda",
    nproc_per_node=4,
)


def make_job(**psft) -> PSFTJob:
    return PSFTJob.model_validate(
        {
            "metadata": {"name": "mapjob"},
            "spec": {
                "model": {
                    "source": "m",
                    "dtype": "bfloat16",
                    "trustRemoteCode": True,
                    "chatTemplate": "{{ x }}",
                },
                "dataset": {
                    "train": ["t.jsonl"],
                    "maxPromptLength": 100,
                    "maxResponseLength": 200,
                    "shuffle": False,
                },
                "psft": {
                    "objective": "psft",
                    "batchSize": 32,
                    "miniBatchSize": 8,
                    "microBatchSize": 4,
                    "clipRatioLow": 0.15,
                    "clipRatioHigh": 0.3,
                    "clipRatioC": 5.0,
                    "lossAggMode": "seq-mean-token-mean",
                    "epochs": 3,
                    "maxSteps": 17,
                    "learningRate": 2e-5,
                    "lrScheduler": "cosine",
                    "warmupSteps": 4,
                    "weightDecay": 0.05,
                    "gradClip": 0.5,
                    "seed": 7,
                    "saveEvery": 5,
                    "keepCheckpoints": 3,
                    "gradientCheckpointing": True,
                    "maxTokensPerMicroBatch": 640,
                    "balanceBatch": False,
                    **psft,
                },
                "resources": {"gpusPerNode": 4, "nodes": 1, "device": "cuda"},
            },
        }
    )


EXPECTED = {
    # verl key: (value, spec field)
    "model.path": ("/models/m", "spec.model.source"),
    "model.trust_remote_code": (True, "spec.model.trustRemoteCode"),
    "model.custom_chat_template": ("{{ x }}", "spec.model.chatTemplate"),
    "model.enable_gradient_checkpointing": (True, "spec.psft.gradientCheckpointing"),
    "engine.mixed_precision.param_dtype": ("bf16", "spec.model.dtype"),
    "data.train_files": (["/run/train.parquet"], "spec.dataset.train"),
    "data.val_files": (["/run/val.parquet"], "spec.dataset.validation"),
    "data.max_length": (300, "spec.dataset.maxResponseLength"),
    "psft.shuffle": (False, "spec.dataset.shuffle"),
    "psft.balance_batch": (False, "spec.psft.balanceBatch"),
    "data.use_dynamic_bsz": (True, "spec.psft.maxTokensPerMicroBatch"),
    "data.max_token_len_per_gpu": (640, "spec.psft.maxTokensPerMicroBatch"),
    "data.train_batch_size": (32, "spec.psft.batchSize"),
    "psft.mini_batch_size": (8, "spec.psft.miniBatchSize"),
    "data.micro_batch_size_per_gpu": (4, "spec.psft.microBatchSize"),
    "psft.objective": ("psft", "spec.psft.objective"),
    "psft.clip_ratio_low": (0.15, "spec.psft.clipRatioLow"),
    "psft.clip_ratio_high": (0.3, "spec.psft.clipRatioHigh"),
    "psft.clip_ratio_c": (5.0, "spec.psft.clipRatioC"),
    "psft.loss_agg_mode": ("seq-mean-token-mean", "spec.psft.lossAggMode"),
    "trainer.total_epochs": (3, "spec.psft.epochs"),
    "trainer.total_training_steps": (17, "spec.psft.maxSteps"),
    "optim.lr": (2e-5, "spec.psft.learningRate"),
    "optim.lr_scheduler_type": ("cosine", "spec.psft.lrScheduler"),
    "optim.lr_warmup_steps": (4, "spec.psft.warmupSteps"),
    # verl's cosine shape, fixed to the native engine's (tests/trainer/test_lr_schedule.py)
    "optim.min_lr_ratio": (0.0, "spec.psft.lrScheduler"),
    "optim.num_cycles": (0.5, "spec.psft.lrScheduler"),
    "optim.zero_indexed_step": (True, "spec.psft.lrScheduler"),
    "optim.weight_decay": (0.05, "spec.psft.weightDecay"),
    "optim.clip_grad": (0.5, "spec.psft.gradClip"),
    "trainer.seed": (7, "spec.psft.seed"),
    "engine.seed": (7, "spec.psft.seed"),
    "trainer.save_freq": (5, "spec.psft.saveEvery"),
    "trainer.max_ckpt_to_keep": (3, "spec.psft.keepCheckpoints"),
    "trainer.nnodes": (1, "spec.resources.nodes"),
    "trainer.n_gpus_per_node": (4, "spec.resources.gpusPerNode"),
    "trainer.device": ("cuda", "spec.resources.device"),
    "trainer.experiment_name": ("mapjob", "metadata.name"),
}


@pytest.fixture(scope="module")
def settings() -> dict[str, Setting]:
    found = verl_settings(make_job(), INPUTS)
    keys = [s.key for s in found]
    assert len(keys) == len(set(keys)), "a verl key is set twice"
    return {s.key: s for s in found}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_each_spec_field_maps_to_its_verl_key(settings, key):
    value, field = EXPECTED[key]
    assert (settings[key].value, settings[key].field) == (value, field)


def test_every_setting_is_accounted_for(settings):
    untested = {k for k, s in settings.items() if k not in EXPECTED and s.field != ENGINE_FIELD}
    # fixed precision parts ride on spec.model.dtype
    assert untested == {
        "engine.mixed_precision.reduce_dtype",
        "engine.mixed_precision.buffer_dtype",
        "optim.lr_warmup_steps_ratio",
    }


def test_engine_internals(settings):
    assert settings["engine.strategy"].value == "fsdp2"
    assert settings["data.pad_mode"].value == "no_padding"
    assert settings["trainer.logger"].value == ["console"]
    assert settings["data.custom_cls.name"].value == "PreTokenizedDataset"


def test_cpu_adds_what_verl_needs_there():
    inputs = VerlInputs(
        model_path="/m", train_files=["/t.parquet"], checkpoint_dir="/c", device="cpu"
    )
    by_key = {s.key: s.value for s in verl_settings(make_job(), inputs)}
    assert by_key["model.use_remove_padding"] is False
    assert by_key["model.override_config.attn_implementation"] == "sdpa"
    assert by_key["engine.use_torch_compile"] is False
    auto = make_job()
    auto.spec.model.dtype = "auto"
    by_key = {s.key: s.value for s in verl_settings(auto, inputs)}
    assert by_key["engine.mixed_precision.param_dtype"] == "fp32"
    gpu = {s.key for s in verl_settings(make_job(), INPUTS)}
    assert "model.use_remove_padding" not in gpu


def test_composed_config_carries_the_values_and_passes_verl_validation():
    config = build_config(make_job(), INPUTS)
    assert config.optim.lr == 2e-5
    assert config.optim.lr_scheduler_type == "cosine"
    assert config.data.train_batch_size == 32
    assert config.psft.mini_batch_size == 8
    assert config.engine.strategy == "fsdp2"
    # verl's defaults that we do not set survive
    assert config.optim.betas == [0.9, 0.999]


def test_a_value_verl_rejects_names_our_field():
    job = make_job()
    bad = [
        Setting(s.key, "exponential", s.field) if s.key == "optim.lr_scheduler_type" else s
        for s in verl_settings(job, INPUTS)
    ]
    with pytest.raises(UserError) as err:
        check_config(apply_settings(base_config(), bad), bad)
    message = str(err.value)
    assert message.startswith("spec.psft.lrScheduler: verl rejected optim.lr_scheduler_type")
    assert "exponential" in message


def test_engine_value_rejected_names_the_engine_field():
    bad = [
        Setting(s.key, "fsdp3", s.field) if s.key == "engine.strategy" else s
        for s in verl_settings(make_job(), INPUTS)
    ]
    with pytest.raises(UserError, match=r"^spec\.psft\.engine: verl rejected engine.strategy"):
        check_config(apply_settings(base_config(), bad), bad)


def test_batch_arithmetic_is_checked_before_launch():
    with pytest.raises(UserError, match=r"^spec\.psft\.miniBatchSize: 12 must divide"):
        build_config(make_job(miniBatchSize=12), INPUTS)
    with pytest.raises(UserError, match=r"^spec\.psft\.batchSize: .*multiples of .*\(4\)"):
        build_config(make_job(batchSize=6, miniBatchSize=6), INPUTS)


def test_processes_per_node(tmp_path):
    """One process per GPU of each node (Ray places them), one per node on CPUs."""
    from psft.trainer.verl.launch import _nproc
    from psft.workflows.stages import StageConfig

    job = make_job()
    job.spec.resources.nodes = 2
    job.spec.resources.gpus_per_node = 8
    config = StageConfig(stage="train", kind="train", job=job, run_root=str(tmp_path))
    assert _nproc(config, "cuda") == 8
    assert _nproc(config, "cpu") == 1


def test_torchrun_argv_is_a_list_of_arguments():
    from psft.trainer.verl.launch import torchrun_argv

    argv = torchrun_argv(4, 29500, ["--verl-config", "/a b/verl.yaml"])
    assert argv[1:4] == ["-m", "torch.distributed.run", "--nnodes=1"]
    assert "--nproc-per-node=4" in argv and argv[-2:] == ["--verl-config", "/a b/verl.yaml"]
