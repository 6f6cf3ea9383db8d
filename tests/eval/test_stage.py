"""The eval stage end to end on the tiny model, checkpoint selection, and bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from psft.trainer.eval import stage
from psft.trainer.eval.backends.base import Generation, SamplingConfig
from psft.trainer.eval.grading import GradingPool
from psft.trainer.eval.registry import Benchmark, Problem
from psft.trainer.storage import LocalRunStore
from psft.workflows.cli import main
from psft.workflows.errors import UserError

RECORD_KEYS = {
    "benchmark", "k", "avg_at_k", "pass_at_k", "maj_at_k", "mean_response_tokens",
    "truncated_fraction", "checkpoint",
}  # fmt: skip


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_stage_from_a_stage_config_file(
    trained_run: Path, make_job: Callable[..., Any], make_config: Callable[..., Any], tmp_path: Path
) -> None:
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"problem": "Pick", "choices": ["x", "y"], "answer": "B"}) + "\n")
    job = make_job(
        benchmarks=["aime24", {"name": "mc", "path": str(mc), "type": "multiple-choice"}],
        samples=3,
        limit=2,
    )
    config_file = tmp_path / "stage.json"
    config_file.write_text(make_config(job, trained_run).dump())

    assert main(["eval", "--config", str(config_file)]) == 0

    out = trained_run / "eval"
    samples = _lines(out / "final" / "aime24.jsonl")
    assert len(samples) == 2 * 3
    assert [(s["id"], s["sample"]) for s in samples[:4]] == [
        ("aime24-0", 0), ("aime24-0", 1), ("aime24-0", 2), ("aime24-1", 0)
    ]  # fmt: skip
    for s in samples:
        assert {"response", "answer", "correct", "tokens", "truncated"} <= set(s)
        assert 0 < s["tokens"] <= 8 and s["correct"] is False  # a random model
    assert len(_lines(out / "final" / "mc.jsonl")) == 3

    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "train" and summary["checkpoints"] == ["final"]
    assert [r["benchmark"] for r in summary["results"]] == ["aime24", "mc"]
    assert summary["settings"]["samples"] == 3
    records = _lines(out / "metrics.jsonl")
    assert [r["benchmark"] for r in records] == ["aime24", "mc"]
    for record in records:
        assert set(record) >= RECORD_KEYS
        assert record["k"] == 3 and record["checkpoint"] == "final"
        assert record["problems"] == (2 if record["benchmark"] == "aime24" else 1)


class ScriptedBackend:
    """Plays back fixed responses (the transformers path is tested on a real model)."""

    name = "scripted"

    def __init__(self, responses: list[list[str]]) -> None:
        self.responses = responses

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, progress: Any = None
    ) -> list[list[Generation]]:
        assert len(prompts) == len(self.responses) and sampling.n == 3
        return [
            [Generation(t, 10 * (i + 1), i == 2) for i, t in enumerate(r)] for r in self.responses
        ]

    def close(self) -> None:
        pass


def test_scores_of_graded_responses(
    make_job: Callable[..., Any],
    make_config: Callable[..., Any],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = make_config(make_job(samples=3), tmp_path)
    bench = Benchmark(
        "two", "math", [Problem("a", "1/2 + 0?", "\\frac{1}{2}"), Problem("b", "2+2?", "4")]
    )
    backend = ScriptedBackend(
        [
            ["so \\boxed{0.5}", "\\boxed{1/2}", "\\boxed{3}"],
            ["\\boxed{5}", "\\boxed{5}", "I think 4"],  # no box: no answer
        ]
    )
    with GradingPool(workers=1) as pool:
        records, row = stage.evaluate_benchmark(backend, tokenizer, bench, config, pool)
    assert [r["correct"] for r in records] == [True, True, False, False, False, False]
    assert [r["answer"] for r in records][3:] == ["5", "5", None]
    assert row["avg_at_k"] == pytest.approx(2 / 6)
    assert row["pass_at_k"] == pytest.approx(0.5)
    assert row["maj_at_k"] == pytest.approx(0.5)
    assert row["mean_response_tokens"] == pytest.approx(20)
    assert row["truncated_fraction"] == pytest.approx(1 / 3)


def test_answer_phrase_option_reaches_the_grader(
    make_job: Callable[..., Any],
    make_config: Callable[..., Any],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bench = Benchmark("one", "math", [Problem("a", "9*3?", "27")])
    responses = [["The answer is: 27 miles", "\\boxed{\\text{27 miles}}", "27"]]
    verdicts = {}
    for option in (False, True):
        config = make_config(make_job(samples=3, acceptAnswerPhrase=option), tmp_path)
        with GradingPool(workers=1) as pool:
            records, _ = stage.evaluate_benchmark(
                ScriptedBackend(responses), tokenizer, bench, config, pool
            )
        verdicts[option] = [(r["answer"], r["correct"]) for r in records]
    # the boxed unit is dropped either way; the phrase counts only with the option
    assert verdicts[False] == [(None, False), ("\\text{27 miles}", True), (None, False)]
    assert verdicts[True] == [("27 miles", True), ("\\text{27 miles}", True), (None, False)]


def test_psft_evaluate_accept_answer_phrase_flag(tiny_model_dir: Path) -> None:
    import argparse

    from psft.trainer.eval.standalone import add_arguments, standalone_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = standalone_config(parser.parse_args([str(tiny_model_dir)]))
    assert default.job.spec.eval.accept_answer_phrase is False
    on = standalone_config(parser.parse_args([str(tiny_model_dir), "--accept-answer-phrase"]))
    assert on.job.spec.eval.accept_answer_phrase is True
    assert on.job.spec.eval.to_wire()["acceptAnswerPhrase"] is True


def _no_generation(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a model was loaded although the input is bad")


def test_missing_checkpoint_fails_before_any_generation(
    run_root: Path, make_job: Callable[..., Any], make_config: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(stage, "open_backend", _no_generation)
    with pytest.raises(UserError, match=r"checkpoint train/final does not exist.*run the train"):
        stage.run(make_config(make_job(), run_root))
    assert not (run_root / "eval" / "summary.json").exists()


def test_bad_benchmarks_fail_before_any_generation(
    trained_run: Path, make_job: Callable[..., Any], make_config: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:  # fmt: skip
    monkeypatch.setattr(stage, "open_backend", _no_generation)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1"}) + "\n")
    job = make_job(benchmarks=["aime24", {"name": "bad", "path": str(bad)}])
    with pytest.raises(UserError, match=r"bad.jsonl: row 1 has no column 'problem'"):
        stage.run(make_config(job, trained_run))
    job = make_job()
    job.spec.eval.benchmarks = ["aime24", "gsm8k"]  # `psft validate` would have said so
    with pytest.raises(UserError, match=r"unknown benchmark 'gsm8k'.*aime25.*math500"):
        stage.run(make_config(job, trained_run))


def _fake_run(root: Path, records: list[dict[str, Any]], saved: list[int], final: bool) -> None:
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "train" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "loss": 1.0, "trunc'
    )
    for step in saved:
        (root / "train" / "checkpoints" / f"step-{step}").mkdir(parents=True)
    if final:
        (root / "train" / "final").mkdir(parents=True)


@pytest.mark.parametrize(
    ("val_losses", "saved", "which", "expected"),
    [
        ({2: 1.5, 4: 1.2, 6: 1.3}, [2, 4], "best", ["step-4"]),
        ({2: 1.5, 4: 1.2, 6: 1.1}, [2, 4], "best", ["final"]),  # the last step is the final model
        ({2: 0.9, 4: 1.2, 6: 1.1}, [4], "best", ["final"]),  # step 2 was pruned
        ({2: 1.5, 4: 1.2, 6: 1.1}, [2, 4], "all", ["step-2", "step-4", "final"]),
        ({2: 1.5, 4: 1.2, 6: 1.1}, [2, 4, 6], "all", ["step-2", "step-4", "final"]),
        ({2: 1.5, 6: 1.1}, [4, 6], "all", ["step-4", "final"]),  # step 2 was pruned
        ({}, [2, 4], "final", ["final"]),
    ],
)
def test_checkpoint_selection(
    run_root: Path, make_job: Callable[..., Any], make_config: Callable[..., Any],
    val_losses: dict[int, float], saved: list[int], which: str, expected: list[str],
) -> None:  # fmt: skip
    records = [{"step": s, "loss": 2.0} for s in range(1, 7)]
    records += [{"step": s, "val_loss": v} for s, v in val_losses.items()]
    _fake_run(run_root, records, saved, final=True)
    job = make_job(checkpoints=which)
    job.spec.psft.save_every = 2
    chosen = stage.select_checkpoints(LocalRunStore(run_root), make_config(job, run_root))
    assert [c.name for c in chosen] == expected


def test_best_needs_validation_and_a_saved_step(
    run_root: Path, make_job: Callable[..., Any], make_config: Callable[..., Any]
) -> None:
    config = make_config(make_job(checkpoints="best"), run_root)
    store = LocalRunStore(run_root)
    with pytest.raises(UserError, match=r"train/metrics\.jsonl is missing"):
        stage.select_checkpoints(store, config)
    _fake_run(run_root, [{"step": 1, "loss": 1.0}], [], final=True)
    with pytest.raises(UserError, match=r"no val_loss: set dataset\.validation"):
        stage.select_checkpoints(store, config)
    shutil.rmtree(run_root / "train")
    _fake_run(run_root, [{"step": 1, "val_loss": 1.0}, {"step": 3, "loss": 1}], [], final=True)
    with pytest.raises(UserError, match=r"none of the validated steps \(1\) has a saved"):
        stage.select_checkpoints(store, config)


def test_checkpoint_folder_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no Hugging Face model"):
        stage.model_folder(tmp_path, "step-4")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert stage.model_folder(tmp_path, "step-4") == tmp_path / "model"


def test_psft_evaluate_on_a_model_folder(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "sums.jsonl"
    data.write_text(json.dumps({"problem": "2+3?", "answer": "5"}) + "\n")
    out = tmp_path / "out"
    argv = ["evaluate", str(tiny_model_dir), "--benchmarks", "amc23", f"{data}:math",
            "--samples", "2", "--limit", "1", "--max-tokens", "4", "--out", str(out),
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "amc23" in printed and "sums" in printed
    assert len(_lines(out / "eval" / "model" / "amc23.jsonl")) == 2
    assert len(_lines(out / "eval" / "model" / "sums.jsonl")) == 2
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["target"] is None and summary["checkpoints"] == ["model"]


def test_psft_evaluate_bad_input_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default output folder is ./runs/evaluate-<model>
    (tmp_path / "keep").mkdir()
    assert main(["evaluate", str(tmp_path / "nope"), "--benchmarks", "aime24"]) == 2
    err = capsys.readouterr().err
    assert "psft evaluate: error: model" in err and "not found" in err
    assert "Traceback" not in err
    # refused: no empty output folder left behind, and nothing else touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert main(["evaluate", str(tmp_path), "--benchmarks", "aime24", "--samples", "0"]) == 2
    assert "samples" in capsys.readouterr().err


@pytest.mark.integration  # serves /metrics on 127.0.0.1 while the stage runs
def test_scores_are_exported_as_prometheus_gauges(
    trained_run: Path, make_job: Callable[..., Any], make_config: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from prometheus_client import generate_latest

    from psft.trainer import telemetry

    opened: list[Any] = []

    class Recording(telemetry.Telemetry):
        def open(self) -> None:
            super().open()
            opened.append(self)

    monkeypatch.setattr(telemetry, "Telemetry", Recording)
    job = make_job(benchmarks=["aime24", "amc23"], samples=2, limit=1)
    job.spec.monitoring.enabled = True
    stage.run(make_config(job, trained_run))
    (tm,) = opened
    text = generate_latest(tm.registry).decode()
    for bench in ("aime24", "amc23"):
        labels = f'benchmark="{bench}",job="evaltest",k="2",namespace="default",stage="eval"'
        assert f"psft_eval_accuracy{{{labels}}} 0.0" in text
        assert f"psft_eval_pass_at_k{{{labels}}} 0.0" in text
