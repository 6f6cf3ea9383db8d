from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from psft.workflows.errors import UserError
from psft.workflows.local import _prepare_run_dir, run_local, stage_argv
from psft.workflows.validate import InvalidJob, validate_job


def make_job(tmp_path: Path, model: str = "m", **spec: dict) -> dict:
    doc = {
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"source": model},
            "dataset": {"train": [str(tmp_path / "train.jsonl")]},
            "storage": {"local": {"path": str(tmp_path / "runs")}},
        },
    }
    doc["spec"].update(spec)
    return doc


def test_stage_argv_is_a_list_without_shell() -> None:
    argv = stage_argv("train", Path("/r/stages/train.json"))
    assert argv[1:] == ["-m", "psft.workflows.cli", "train", "--config", "/r/stages/train.json"]


def test_run_dir_refuses_a_different_spec(tmp_path: Path) -> None:
    job = validate_job(make_job(tmp_path))
    run_dir = _prepare_run_dir(job, fresh=False)
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert spec["spec"]["psft"]["clipRatioHigh"] == 0.28  # defaults resolved
    assert _prepare_run_dir(job, fresh=False) == run_dir  # same spec: fine
    changed = validate_job(make_job(tmp_path, psft={"learningRate": 1e-5}))
    with pytest.raises(UserError, match="different spec"):
        _prepare_run_dir(changed, fresh=False)
    (run_dir / "keep.txt").write_text("x")
    (run_dir / "train").mkdir()
    assert _prepare_run_dir(changed, fresh=True) == run_dir
    # --fresh discards psft's own outputs, never a file the user put there
    assert (run_dir / "keep.txt").read_text() == "x"
    assert not (run_dir / "train").exists()
    assert (
        yaml.safe_load((run_dir / "spec.yaml").read_text())["spec"]["psft"]["learningRate"] == 1e-5
    )


def _users_home(tmp_path: Path) -> Path:
    home = tmp_path / "runs" / "tiny"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    (home / "notes.txt").write_text("mine")
    return home


@pytest.mark.parametrize("fresh", [True, False])
def test_a_folder_psft_did_not_create_is_never_written_or_deleted(
    tmp_path: Path, fresh: bool
) -> None:
    home = _users_home(tmp_path)
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    job = validate_job(make_job(tmp_path))
    with pytest.raises(UserError, match="holds no psft run"):
        _prepare_run_dir(job, fresh=fresh)
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before
    assert (home / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8 a cat"


def test_fresh_through_the_cli_refuses_a_users_folder(tmp_path: Path) -> None:
    home = _users_home(tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(make_job(tmp_path)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "psft.workflows.cli",
            "run",
            str(spec),
            "--fresh",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "holds no psft run" in proc.stderr and "Traceback" not in proc.stderr
    assert (home / "notes.txt").read_text() == "mine"


def test_a_run_folder_is_marked_and_a_file_in_its_place_is_refused(tmp_path: Path) -> None:
    job = validate_job(make_job(tmp_path))
    run_dir = _prepare_run_dir(job, fresh=False)
    assert (run_dir / ".psft-run").is_file()
    (run_dir / ".psft-run").unlink()  # a run made before the marker: recognised by spec.yaml
    assert _prepare_run_dir(job, fresh=True) == run_dir
    assert (run_dir / ".psft-run").is_file()
    other = validate_job(make_job(tmp_path) | {"metadata": {"name": "other"}})
    (tmp_path / "runs" / "other").write_text("a file, not a folder")
    with pytest.raises(UserError, match="not a folder"):
        _prepare_run_dir(other, fresh=True)
    assert (tmp_path / "runs" / "other").read_text() == "a file, not a folder"


@pytest.mark.parametrize("path", ["", "  ", "/", "//", "/.."])
def test_an_empty_or_root_local_path_is_a_field_error(tmp_path: Path, path: str) -> None:
    doc = make_job(tmp_path, storage={"local": {"path": path}})
    with pytest.raises(InvalidJob, match=r"spec\.storage\.local\.path"):
        validate_job(doc)
    job = validate_job(make_job(tmp_path))
    with pytest.raises(UserError, match="--runs-dir"):
        run_local(job, runs_dir=path)


def test_only_rejects_unknown_stage(tmp_path: Path) -> None:
    job = validate_job(make_job(tmp_path))
    with pytest.raises(UserError, match="unknown stage"):
        run_local(job, only=["training"])


def write_demonstrations(path: Path, n: int = 12) -> None:
    rows = [
        {
            "id": f"r{i}",
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "demonstration": f"We add {i} and {i}: the sum is {2 * i}. \\boxed{{{2 * i}}}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.integration
def test_psft_run_end_to_end_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_demonstrations(tmp_path / "train.jsonl")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(
        "".join(
            json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
            for i in range(3)
        )
    )
    doc = make_job(
        tmp_path,
        model=str(tiny_model_dir),
        psft={
            "batchSize": 4,
            "miniBatchSize": 2,
            "microBatchSize": 1,
            "maxSteps": 3,
            "learningRate": 1e-3,
            "warmupSteps": 1,
            "saveEvery": 2,
        },
        resources={"device": "cpu"},
        eval={
            "benchmarks": [{"name": "adds", "path": str(bench)}],
            "samples": 2,
            "maxTokens": 12,
            "limit": 2,
        },
        monitoring={"metricsPort": 0},
    )
    doc["spec"]["dataset"].update(maxPromptLength=64, maxResponseLength=64)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "psft.workflows.cli", "run", str(job_file), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    records = [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][:3] == [1, 2, 3]
    assert all(r["entropy"] > 0 for r in records if "entropy" in r)
    assert list((run / "train/final").glob("*.safetensors"))
    assert (run / "report/entropy.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["training"]["train"]["steps"] == 3
    assert summary["eval"] and summary["eval"][0]["benchmark"] == "adds"
    assert "summary.json" in proc.stderr + proc.stdout
    # a rerun of the same spec skips every finished stage
    again = subprocess.run(
        [sys.executable, "-m", "psft.workflows.cli", "run", str(job_file), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert again.returncode == 0
    assert again.stderr.count("skipped") >= 4


@pytest.mark.integration
def test_compare_runs_an_sft_arm_after_the_psft_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    """spec.compare with `psft run`: train, eval, train-sft, eval-sft, report in that order;
    the SFT arm trains the same batches from the same start with the SFT objective, and the
    report overlays both arms."""
    from psft.workflows.run_folder import OWN_ENTRIES

    write_demonstrations(tmp_path / "train.jsonl", n=16)
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": "What is 2 + 1?", "answer": "3"}) + "\n")
    doc = make_job(
        tmp_path,
        model=str(tiny_model_dir),
        psft={"batchSize": 4, "miniBatchSize": 2, "microBatchSize": 1, "maxSteps": 3,
              "learningRate": 3e-3, "warmupSteps": 0, "saveEvery": 3},
        dataset={"train": [str(tmp_path / "train.jsonl")], "maxPromptLength": 64,
                 "maxResponseLength": 64, "validation": {"fraction": 0.25}},
        resources={"device": "cpu"},
        eval={"benchmarks": [{"name": "adds", "path": str(bench)}], "samples": 1,
              "maxTokens": 6},
        monitoring={"enabled": False},
        compare={"enabled": True},
    )  # fmt: skip
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(doc))
    argv = [sys.executable, "-m", "psft.workflows.cli", "run", str(job_file), "--no-progress"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    order = [out.index(f"── {name} ") for name in ("train", "eval", "train-sft", "eval-sft")]
    assert order == sorted(order)

    run = tmp_path / "runs" / "tiny"

    def steps(stage: str) -> list[dict]:
        lines = (run / stage / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    psft, sft = steps("train"), steps("train-sft")
    # the same start: identical step-0 baselines; the same batches: identical token counts
    assert psft[0]["step"] == sft[0]["step"] == 0
    assert psft[0]["val_loss"] == sft[0]["val_loss"]
    assert [r["tokens"] for r in psft[1:]] == [r["tokens"] for r in sft[1:]]
    # step 1's first update is the same for both (ratio 1 everywhere): equal entropy
    assert psft[1]["entropy"] == pytest.approx(sft[1]["entropy"], rel=1e-6)
    assert all(r["clip_fraction"] == 0.0 for r in sft[1:])
    assert max(r["clip_fraction"] for r in psft[1:]) > 0.0
    assert json.loads((run / "train-sft/summary.json").read_text())["objective"] == "sft"
    assert list((run / "train-sft/final").glob("*.safetensors"))

    summary = json.loads((run / "summary.json").read_text())
    assert {s: v["arm"] for s, v in summary["training"].items()} == {
        "train": "psft", "train-sft": "sft",
    }  # fmt: skip
    assert sorted(r["arm"] for r in summary["eval"]) == ["psft", "sft"]
    assert set(summary["comparison"]) == {"psft", "sft"}
    assert summary["comparison"]["sft"]["clip_fraction_mean"] == 0.0
    assert "## PSFT vs SFT" in (run / "report/report.md").read_text()
    assert {"train-sft", "eval-train-sft"} <= set(OWN_ENTRIES)  # --fresh removes them too
