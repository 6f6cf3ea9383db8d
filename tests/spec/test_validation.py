from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from psft.workflows.spec import SEED_SYSTEM_PROMPT, PSFTJob
from psft.workflows.spec_file import SpecFileError
from psft.workflows.validate import InvalidJob, load_job, validate_job

sys.path.insert(0, str(Path(__file__).parents[1] / "workflows"))
from workflow_examples import EXPECTED_ERRORS, MINIMAL_JOB

BASE = MINIMAL_JOB


def job_with(**sections: dict) -> dict:
    doc = copy.deepcopy(BASE)
    for name, values in sections.items():
        doc["spec"].setdefault(name, {}).update(values)
    return doc


def errors_of(doc: dict) -> list[str]:
    with pytest.raises(InvalidJob) as info:
        validate_job(doc)
    return [str(e) for e in info.value.errors]


def test_defaults_follow_the_seed() -> None:
    job = validate_job(BASE)
    p = job.spec.psft
    assert (p.clip_ratio_low, p.clip_ratio_high, p.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert (p.batch_size, p.mini_batch_size, p.updates_per_step) == (64, 8, 8)
    assert (p.learning_rate, p.warmup_steps, p.weight_decay, p.grad_clip) == (1e-6, 10, 0.1, 1.0)
    assert job.spec.dataset.demonstration_key == "demonstration"
    assert job.spec.dataset.system_prompt == SEED_SYSTEM_PROMPT
    assert job.spec.model.trust_remote_code is False
    assert job.spec.eval.samples == 32 and job.spec.eval.temperature == 0.7


def test_wire_format_is_camel_case_and_round_trips() -> None:
    job = validate_job(BASE)
    wire = job.to_wire()
    assert "miniBatchSize" in wire["spec"]["psft"]
    assert "mini_batch_size" not in wire["spec"]["psft"]
    assert PSFTJob.model_validate(wire) == job


def test_mini_batch_must_divide_batch() -> None:
    assert errors_of(job_with(psft={"miniBatchSize": 12})) == [
        "spec.psft.miniBatchSize: (12) must divide spec.psft.batchSize (64)"
    ]


def test_mini_batch_larger_than_batch() -> None:
    [err] = errors_of(job_with(psft={"batchSize": 8, "miniBatchSize": 16, "microBatchSize": 2}))
    assert err == "spec.psft.miniBatchSize: (16) must be at most spec.psft.batchSize (8)"


def test_unknown_field_names_its_path() -> None:
    [err] = errors_of(job_with(psft={"learningrate": 1e-5}))
    assert err.startswith("spec.psft.learningrate: unknown field")


def test_all_schema_errors_reported_at_once() -> None:
    errs = errors_of(
        job_with(psft={"clipRatioLow": 1.5, "batchSize": 0}, dataset={"truncation": "middle"})
    )
    paths = sorted(e.split(":")[0] for e in errs)
    assert paths == ["spec.dataset.truncation", "spec.psft.batchSize", "spec.psft.clipRatioLow"]


def test_context_length_of_registered_model() -> None:
    [err] = errors_of(job_with(dataset={"maxPromptLength": 4096, "maxResponseLength": 8192}))
    assert "exceeds the model's context length (8192)" in err
    assert err.startswith("spec.dataset.maxResponseLength")


def test_context_length_from_local_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 2048}')
    doc = job_with(model={"source": str(tmp_path)}, dataset={"maxResponseLength": 2000})
    [err] = errors_of(doc)
    assert "(2048)" in err


def test_cross_field_rules() -> None:
    errs = errors_of(
        job_with(
            storage={"type": "s3"},
            grpo={"enabled": True},
            eval={"benchmarks": ["aime24", "gpqa", "aime24"]},
        )
    )
    joined = "\n".join(errs)
    assert "spec.storage.s3: is required when spec.storage.type is 's3'" in joined
    assert "spec.grpo.prompts: is required" in joined
    assert "spec.eval.benchmarks[1]: unknown benchmark 'gpqa'" in joined
    assert "spec.eval.benchmarks[2]: benchmark 'aime24' is listed twice" in joined


def test_custom_benchmark_and_server_metadata_accepted() -> None:
    doc = job_with(eval={"benchmarks": [{"name": "gpqa-diamond", "path": "s3://bench/gpqa.jsonl"}]})
    doc["metadata"].update(resourceVersion="7", uid="abc", generation=2, managedFields=[])
    job = validate_job(doc)
    assert job.metadata.uid == "abc"
    assert job.spec.eval.benchmarks[0].name == "gpqa-diamond"  # type: ignore[union-attr]


def test_bad_name_is_explained() -> None:
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = "My_Job"
    [err] = errors_of(doc)
    assert err.startswith("metadata.name:")


def test_cli_validate_prints_every_error_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: psft.dev/v1alpha1\nkind: PSFTJob\nmetadata: {name: x}\n"
        "spec:\n  model: {source: m}\n  dataset: {train: [a.jsonl]}\n"
        "  psft: {miniBatchSize: 12, microBatchSize: 5}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "psft.workflows.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "spec.psft.miniBatchSize (12)" in proc.stderr.replace(": (", " (")
    assert "spec.psft.microBatchSize" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_job_reports_unreadable_and_malformed_files(tmp_path: Path) -> None:
    # problems of the file itself, not of its fields: psft exits 2 for them (tests/spec/
    # test_spec_files.py has every kind)
    with pytest.raises(SpecFileError, match="cannot read file"):
        load_job(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed")
    with pytest.raises(SpecFileError, match="not valid YAML"):
        load_job(broken)


def test_multi_node_needs_verl_and_gpus_per_node() -> None:
    validate_job(job_with(resources={"nodes": 2, "gpusPerNode": 8}))
    validate_job(job_with(resources={"nodes": 2, "device": "cpu"}))
    assert errors_of(job_with(psft={"engine": "native"}, resources={"nodes": 2})) == [
        "spec.psft.engine: 'native' runs on one node; resources.nodes is 2: use 'verl' or 'auto'"
    ]
    assert errors_of(job_with(resources={"nodes": 2, "gpusPerNode": 0})) == [
        "spec.resources.gpusPerNode: must be > 0 for multi-node training"
    ]


def test_examples_validate(repo_root: Path) -> None:
    examples = sorted((repo_root / "examples").glob("*.yaml"))
    assert examples, "examples/ has no PSFTJob"
    for path in examples:
        expected = EXPECTED_ERRORS.get(path.name)
        if expected is None:
            load_job(path)
            continue
        with pytest.raises(InvalidJob) as info:
            load_job(path)
        assert sorted({e.path for e in info.value.errors}) == sorted(expected)


def test_a_lone_surrogate_is_a_field_error() -> None:
    """YAML and JSON escapes (`"\\ud800"`) make strings no UTF-8 writer takes: they passed
    validation, then rendering and stage.json failed with a serialization traceback."""
    doc = job_with(dataset={"promptKey": "question\ud800"})
    doc["spec"]["psft"] = {"seed\udc80": 1}
    errs = errors_of(doc)
    joined = "\n".join(errs)
    assert "spec.dataset.promptKey: holds a lone UTF-16 surrogate" in joined
    assert "spec.psft.seed\\udc80: this key holds a lone UTF-16 surrogate" in joined
    for err in errs:
        err.encode()  # every message can be printed and written
