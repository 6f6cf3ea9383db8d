"""An error shows a long offending value cut short, with its length; never the whole value."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from psft.workflows.cli import main
from psft.workflows.validate import FieldError, InvalidJob, validate_job

sys.path.insert(0, str(Path(__file__).parents[1] / "workflows"))
from workflow_examples import MINIMAL_JOB

HUGE = 100_000


def message_of(doc: dict) -> str:
    with pytest.raises(InvalidJob) as info:
        validate_job(doc)
    return str(info.value)


def with_spec(**sections: dict) -> dict:
    doc = copy.deepcopy(MINIMAL_JOB)
    doc["spec"].update(sections)
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        {**MINIMAL_JOB, "metadata": {"name": "n" * HUGE}},  # pattern and length
        with_spec(eval={"benchmarks": ["b" * HUGE]}),  # a cross-field rule
        with_spec(psft={"k" * HUGE: 1}),  # an unknown field: the path itself
        with_spec(dataset={"train": ["t" * HUGE]}),  # a path field
        with_spec(psft={"engine": "e" * HUGE}),  # a Literal
        with_spec(psft={"seed": "1" * 4000}),  # a number written as a string
    ],
    ids=["name", "benchmark", "unknown-field", "path", "literal", "number"],
)
def test_a_huge_value_is_cut_in_the_message(doc: dict) -> None:
    message = message_of(doc)
    assert len(message) < 1000, message[:2000]
    assert "characters)" in message or "characters cut" in message


def test_a_cut_value_keeps_its_start_and_says_its_length() -> None:
    message = message_of(with_spec(eval={"benchmarks": ["b" * HUGE]}))
    assert f"'{'b' * 150}" in message and f"({HUGE} characters)" in message
    assert "registered:" in message  # the fix after the value is kept


def test_a_long_message_keeps_its_beginning_and_its_fix() -> None:
    line = str(FieldError("spec.x", "starts here " + "y " * 20_000 + "; the fix is here"))
    assert len(line) < 1000
    assert line.startswith("spec.x: starts here") and line.endswith("; the fix is here")
    assert "characters cut" in line


def test_short_messages_are_left_alone() -> None:
    message = "(12) must divide spec.psft.batchSize (64)"
    assert str(FieldError("spec.psft.miniBatchSize", message)).endswith(message)


def test_thousands_of_errors_are_summed_up() -> None:
    doc = with_spec(dataset={"train": list(range(5000))})
    with pytest.raises(InvalidJob) as info:
        validate_job(doc)
    assert len(info.value.errors) == 5000  # every error stays available to callers
    message = str(info.value)
    assert message.count("\n  - ") <= 51 and "and 4950 more" in message
    assert len(message) < 10_000


def test_cli_validate_output_stays_small(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(with_spec(eval={"benchmarks": ["b" * HUGE], "samples": -1})))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert len(err) < 2000 and "spec.eval.samples" in err


def test_a_long_or_undecodable_source_is_cut_and_escaped() -> None:
    """The source (a file name, or the operator's namespace/name) starts the first line."""
    error = InvalidJob([FieldError("spec.x", "bad")], "d/" * 3000 + "job\udcff.yaml")
    first = str(error).splitlines()[0]
    assert len(first) < 300 and "characters cut" in first
    first.encode()  # printable: the undecodable byte is shown as an escape
    assert "\\udcff" in first
