"""Benchmarks (shipped and custom files), prompts and the Avg@k / pass@k / maj@k scores."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from psft.trainer.eval.grading import extract_choice
from psft.trainer.eval.metrics import Sample, majority_correct, pass_at_k, summarize
from psft.trainer.eval.prompts import build_messages, encode_prompts, eval_system_prompt
from psft.trainer.eval.registry import Problem, load_benchmark, load_registered
from psft.workflows.benchmarks import REGISTERED_BENCHMARKS
from psft.workflows.errors import UserError
from psft.workflows.spec import SEED_SYSTEM_PROMPT, CustomBenchmark, PSFTJobSpec


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# registry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count"),
    [("aime24", 30), ("aime25", 30), ("amc23", 40), ("math500", 500), ("minerva", 272)],
)
def test_registered_benchmarks_load(name: str, count: int) -> None:
    bench = load_registered(name)
    assert bench.kind == "math" and len(bench.problems) == count
    assert all(p.problem.strip() and p.answer.strip() for p in bench.problems)
    assert len({p.id for p in bench.problems}) == count
    assert len(bench.limited(3).problems) == 3


def test_registry_matches_the_validation_name_list() -> None:
    from importlib import resources

    shipped = {
        p.name.removesuffix(".jsonl")
        for p in (resources.files("psft.trainer.eval") / "data").iterdir()
        if p.name.endswith(".jsonl")
    }
    assert shipped == set(REGISTERED_BENCHMARKS)


def test_unknown_benchmark_lists_the_registry() -> None:
    with pytest.raises(UserError) as err:
        load_benchmark("aime2024")
    for name in REGISTERED_BENCHMARKS:
        assert name in str(err.value)


def test_custom_math_file(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [{"question": "1+1?", "final": 2}, {"question": "2+2?", "final": "4"}],
    )
    spec = CustomBenchmark(name="mine", path=str(path), problem_key="question", answer_key="final")
    bench = load_benchmark(spec)
    assert bench.kind == "math"
    assert bench.problems == [Problem("mine-0", "1+1?", "2"), Problem("mine-1", "2+2?", "4")]


def test_custom_file_missing_column_names_file_row_and_column(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "bad.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "x"}]
    )
    with pytest.raises(UserError) as err:
        load_benchmark(CustomBenchmark(name="bad", path=str(path)))
    message = str(err.value)
    assert str(path) in message and "row 2" in message and "'answer'" in message
    assert "answerKey" in message and "problem" in message  # the fix and the columns it has


def test_custom_file_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_benchmark(CustomBenchmark(name="x", path=str(tmp_path / "nope.jsonl")))


def test_mmlu_pro_layout_options_list_and_letter(tmp_path: Path) -> None:
    # MMLU-Pro's published columns: question, options (up to 10), answer (letter), answer_index
    rows = [
        {
            "question_id": 70,
            "question": "Which is a prime?",
            "options": ["4", "6", "7", "8", "9", "10", "12", "14", "15", "16"],
            "answer": "C",
            "answer_index": 2,
        },
        {"question": "Largest?", "options": ["1", "2", "3"], "answer": "C", "answer_index": 2},
    ]
    path = _write_jsonl(tmp_path / "mmlu_pro.jsonl", rows)
    spec = CustomBenchmark(
        name="mmlu-pro",
        path=str(path),
        type="multiple-choice",
        problem_key="question",
        choices_key="options",
    )
    bench = load_benchmark(spec)
    assert bench.kind == "multiple-choice"
    assert bench.problems[0].answer == "C" and len(bench.problems[0].choices) == 10
    assert bench.problems[1].choices == ("1", "2", "3")
    by_index = CustomBenchmark(
        name="mmlu-pro",
        path=str(path),
        type="multiple-choice",
        problem_key="question",
        choices_key="options",
        answer_key="answer_index",
    )
    assert [p.answer for p in load_benchmark(by_index).problems] == ["C", "C"]


def test_lettered_columns_layout_from_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mc.parquet"
    table = pa.Table.from_pylist(
        [{"problem": "Pick B", "A": "no", "B": "yes", "C": "no", "D": "no", "answer": "(B)"}]
    )
    pq.write_table(table, path)
    bench = load_benchmark(CustomBenchmark(name="mc", path=str(path), type="multiple-choice"))
    assert bench.problems[0].choices == ("no", "yes", "no", "no")
    assert bench.problems[0].answer == "B"


def test_gpqa_published_csv_layout(tmp_path: Path) -> None:
    path = tmp_path / "gpqa_diamond.csv"
    fields = [
        "Record ID",
        "Question",
        "Correct Answer",
        "Incorrect Answer 1",
        "Incorrect Answer 2",
        "Incorrect Answer 3",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for i in range(6):
            writer.writerow(
                dict(zip(fields, [f"rec{i}", f"Q{i}?", f"right{i}", "w1", "w2", "w3"], strict=True))
            )
    spec = CustomBenchmark(name="gpqa", path=str(path), type="multiple-choice")
    first = load_benchmark(spec)
    again = load_benchmark(spec)
    assert first == again  # the option order is fixed per question
    for i, p in enumerate(first.problems):
        assert p.id == f"rec{i}" and sorted(p.choices) == sorted([f"right{i}", "w1", "w2", "w3"])
        assert p.choices["ABCD".index(p.answer)] == f"right{i}"
    assert len({p.answer for p in first.problems}) > 1  # not always the same letter


def test_multiple_choice_bad_answer(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mc.jsonl", [{"problem": "?", "choices": ["a", "b"], "answer": "E"}]
    )
    with pytest.raises(UserError, match=r"row 1.*outside the 2 options"):
        load_benchmark(CustomBenchmark(name="mc", path=str(path), type="multiple-choice"))
    path = _write_jsonl(tmp_path / "mc2.jsonl", [{"problem": "?", "answer": "A"}])
    with pytest.raises(UserError, match=r"mc2.jsonl: row 1 has no column 'choices'"):
        load_benchmark(CustomBenchmark(name="mc2", path=str(path), type="multiple-choice"))


# prompts ---------------------------------------------------------------------------------


def _spec(**parts: Any) -> PSFTJobSpec:
    return PSFTJobSpec.model_validate(
        {"model": {"source": "m"}, "dataset": {"train": ["t"]}, **parts}
    )


def test_system_prompt_is_the_training_one_unless_set() -> None:
    assert eval_system_prompt(_spec()) == SEED_SYSTEM_PROMPT
    trained = _spec(dataset={"train": ["t"], "systemPrompt": "Be brief."})
    assert eval_system_prompt(trained) == "Be brief."
    assert eval_system_prompt(_spec(eval={"systemPrompt": "Eval only."})) == "Eval only."
    assert eval_system_prompt(_spec(eval={"systemPrompt": ""})) is None


def test_multiple_choice_prompt_letters_the_options() -> None:
    problem = Problem("q", "Which is even?", "B", ("3", "4", "5"))
    messages = build_messages(problem, "multiple-choice", "SYS")
    assert messages[0] == {"role": "system", "content": "SYS"}
    text = messages[1]["content"]
    assert "Which is even?" in text and "(A) 3\n(B) 4\n(C) 5" in text
    assert "\\boxed{}" in text
    # the format the template asks for is what the grader extracts
    assert extract_choice("... so \\boxed{B}", 3) == "B"
    assert build_messages(Problem("m", "1+1?", "2"), "math", None) == [
        {"role": "user", "content": "1+1?"}
    ]


def test_prompts_use_the_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bench = load_registered("amc23").limited(2)
    ids = encode_prompts(tokenizer, bench, "Reason.")
    text = tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>system\nReason.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert bench.problems[0].problem[:20] in text
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="chatTemplate"):
        encode_prompts(tokenizer, bench, None)


# metrics ---------------------------------------------------------------------------------


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 2, 1), (5, 2, 2), (8, 3, 4), (8, 1, 8)])
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k))
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def _s(answer: str | None, correct: bool, tokens: int = 10, truncated: bool = False) -> Sample:
    return Sample(answer, correct, tokens, truncated)


def test_majority_vote() -> None:
    assert majority_correct([_s("5", True), _s("4", False), _s("5", True)])
    assert not majority_correct([_s("4", False), _s("5", True), _s("4", False)])
    # equal normalised forms vote together: \frac12 and \dfrac{1}{2}
    assert majority_correct([_s("\\frac12", True), _s("\\dfrac{1}{2}", True), _s("3", False)])
    assert not majority_correct([_s(None, False), _s(None, False)])
    assert majority_correct([_s(None, False), _s(None, False), _s("7", True)])  # no-answers abstain
    assert majority_correct([_s("7", True), _s("8", False)])  # a tie goes to the first answer


def test_summarize() -> None:
    per_problem = [
        [_s("5", True, 10), _s("4", False, 30, True), _s("5", True, 20), _s(None, False, 40, True)],
        [_s("1", False, 10), _s("1", False, 10), _s("2", True, 10), _s("3", False, 10)],
    ]
    scores = summarize(per_problem)
    assert scores["k"] == 4 and scores["problems"] == 2
    assert scores["avg_at_k"] == pytest.approx(3 / 8)
    assert scores["pass_at_k"] == pytest.approx(1.0)
    assert scores["maj_at_k"] == pytest.approx(0.5)
    assert scores["pass_at"]["1"] == pytest.approx(3 / 8)
    assert scores["pass_at"]["2"] == pytest.approx(
        (_brute_pass_at_k(4, 2, 2) + _brute_pass_at_k(4, 1, 2)) / 2
    )
    assert scores["mean_response_tokens"] == pytest.approx(140 / 8)
    assert scores["truncated_fraction"] == pytest.approx(2 / 8)
    assert scores["no_answer_fraction"] == pytest.approx(1 / 8)
    with pytest.raises(ValueError):
        summarize([[_s("1", True)], [_s("1", True), _s("2", False)]])


def test_custom_file_from_s3_goes_through_fetch(tmp_path: Path) -> None:
    local = _write_jsonl(tmp_path / "remote.jsonl", [{"problem": "1+1?", "answer": "2"}])
    fetched: list[str] = []

    def fetch(uri: str) -> Path:
        fetched.append(uri)
        return local

    spec = CustomBenchmark(name="remote", path="s3://bucket/eval/remote.jsonl")
    bench = load_benchmark(spec, fetch=fetch)
    assert fetched == ["s3://bucket/eval/remote.jsonl"]
    assert bench.problems == [Problem("remote-0", "1+1?", "2")]
    assert bench.source == "s3://bucket/eval/remote.jsonl"
