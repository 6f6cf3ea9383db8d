from __future__ import annotations

from psft.workflows import layout
from psft.workflows.pipeline import build_pipeline
from psft.workflows.stages import StageConfig, stage_config
from psft.workflows.validate import validate_job

BASE = {
    "metadata": {"name": "demo", "namespace": "ml"},
    "spec": {"model": {"source": "m"}, "dataset": {"train": ["d.jsonl"]}},
}


def names(doc: dict) -> list[str]:
    return [s.name for s in build_pipeline(validate_job(doc))]


def test_default_pipeline() -> None:
    assert names(BASE) == ["prepare", "train", "eval", "report"]


def test_grpo_adds_stage_and_second_eval() -> None:
    doc = {**BASE, "spec": {**BASE["spec"], "grpo": {"enabled": True, "prompts": ["p.jsonl"]}}}
    stages = build_pipeline(validate_job(doc))
    assert [s.name for s in stages] == ["prepare", "train", "eval", "grpo", "eval-grpo", "report"]
    by_name = {s.name: s for s in stages}
    assert by_name["eval-grpo"].target == "grpo" and by_name["eval"].target == "train"
    seen: set[str] = set()
    for s in stages:  # each stage after its dependencies
        assert set(s.depends) <= seen
        seen.add(s.name)


def test_no_eval() -> None:
    doc = {**BASE, "spec": {**BASE["spec"], "eval": {"enabled": False}}}
    assert names(doc) == ["prepare", "train", "report"]


def test_run_roots() -> None:
    job = validate_job(BASE)
    assert layout.run_root(job) == "runs/demo"
    s3 = {
        **BASE,
        "metadata": {**BASE["metadata"], "uid": "u-1"},
        "spec": {
            **BASE["spec"],
            "storage": {"type": "s3", "s3": {"endpoint": "minio:9000", "bucket": "ckpt"}},
        },
    }
    assert layout.run_root(validate_job(s3)) == "s3://ckpt/psft/ml/demo/u-1"


def test_stage_config_round_trip() -> None:
    job = validate_job(BASE)
    stage = build_pipeline(job)[2]
    config = stage_config(job, stage, "runs/demo")
    again = StageConfig.model_validate_json(config.dump())
    assert again == config and again.target == "train" and again.kind == "eval"


def with_spec(**sections) -> dict:
    return {**BASE, "spec": {**BASE["spec"], **sections}}


def test_compare_adds_an_sft_arm_beside_the_psft_one() -> None:
    stages = build_pipeline(validate_job(with_spec(compare={"enabled": True})))
    by_name = {s.name: s for s in stages}
    assert [s.name for s in stages] == ["prepare", "train", "eval", "train-sft", "eval-sft",
                                        "report"]  # fmt: skip
    # a parallel branch: the SFT arm needs only the prepared data
    assert by_name["train-sft"].depends == ("prepare",)
    assert by_name["train-sft"].objective == "sft" and by_name["train"].objective is None
    assert by_name["eval-sft"].target == "train-sft"
    assert set(by_name["report"].depends) == {"eval", "eval-sft"}
    config = stage_config(validate_job(with_spec(compare={"enabled": True})),
                          by_name["train-sft"], "runs/demo")  # fmt: skip
    assert config.psft_spec().objective == "sft"
    assert config.job.spec.psft.objective == "psft"  # the job itself is unchanged
    again = StageConfig.model_validate_json(config.dump())
    assert again.objective == "sft" and again.psft_spec().objective == "sft"
    assert layout.eval_dir("train-sft") == "eval-train-sft"


def test_compare_without_eval_ends_both_arms_in_the_report() -> None:
    doc = with_spec(compare={"enabled": True}, eval={"enabled": False})
    stages = {s.name: s for s in build_pipeline(validate_job(doc))}
    assert set(stages["report"].depends) == {"train", "train-sft"}


def test_compare_needs_the_psft_objective_and_the_native_engine() -> None:
    import pytest

    from psft.workflows.validate import InvalidJob

    for sections, fix in [
        ({"psft": {"objective": "sft"}}, "set psft.objective: psft"),
        ({"psft": {"engine": "verl"}}, "psft.engine: native"),
        # engine auto with several GPUs resolves to verl, which would train both arms alike
        ({"resources": {"gpusPerNode": 2, "device": "cuda"}}, "resolves to 'verl'"),
    ]:
        with pytest.raises(InvalidJob) as info:
            validate_job(with_spec(compare={"enabled": True}, **sections))
        assert [e.path for e in info.value.errors] == ["spec.compare.enabled"]
        assert fix in info.value.errors[0].message


def test_the_sft_arm_trains_the_sft_objective_on_either_engine() -> None:
    from psft.trainer.verl.config import VerlInputs, verl_settings

    job = validate_job(with_spec(compare={"enabled": True}))
    arm = StageConfig(stage="train-sft", kind="train", job=job, run_root="r", objective="sft")
    assert arm.trained_job().spec.psft.objective == "sft"
    assert arm.trained_job().spec.psft.model_copy(update={"objective": "psft"}) == job.spec.psft
    assert job.spec.psft.objective == "psft"  # the job itself is unchanged
    main = StageConfig(stage="train", kind="train", job=job, run_root="r")
    assert main.trained_job() is job
    inputs = VerlInputs(
        model_path="/m",
        train_files=["/t.parquet"],
        val_files=[],
        checkpoint_dir="/c",
        device="cpu",
        nproc_per_node=1,
    )
    by_key = {s.key: s.value for s in verl_settings(arm.trained_job(), inputs)}
    assert by_key["psft.objective"] == "sft"
