"""A PSFTJob file that cannot be read as a small YAML or JSON mapping is refused in one line
that names the file and the fix, with exit code 2; never a traceback, never a hang."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import yaml

from psft.workflows.cli import main
from psft.workflows.spec_file import MAX_DEPTH, MAX_SPEC_BYTES, MAX_VALUES, describe_os_error

sys.path.insert(0, str(Path(__file__).parents[1] / "workflows"))
from workflow_examples import MINIMAL_JOB

VALID_YAML = yaml.safe_dump(MINIMAL_JOB, sort_keys=False)
LINES = VALID_YAML.count("\n")
SPEC_LINE = VALID_YAML.splitlines().index("spec:") + 1


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_clear_line(err: str, path: Path, *expected: str) -> None:
    assert err.count("\n") == 1 and err.startswith("psft "), err[:2000]
    assert str(path) in err and "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert len(err) < 600, err[:2000]


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return VALID_YAML + "status:\n" + "".join(f"  {line}\n" for line in lines)


BAD_CONTENT: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), ("binary file",)),
    "latin-1": ("metadata: {name: caf\xe9}\n".encode("latin-1"), ("not UTF-8", "byte 0xe9")),
    "utf-16": (VALID_YAML.encode("utf-16"), ("UTF-16", "save it as UTF-8")),
    "empty": (b"", ("is empty",)),
    "syntax": (b"spec: [unclosed", ("not valid YAML", "line 1")),
    "deep-flow": (
        ("spec: " + "[" * 5000 + "]" * 5000).encode(),
        (f"nested more than {MAX_DEPTH} levels", "line 1"),
    ),
    "deep-block": (("- " * 5000 + "1\n").encode(), (f"more than {MAX_DEPTH} levels",)),
    "deep-mapping": (
        "".join(f"{' ' * i}k{i}:\n" for i in range(400)).encode(),
        (f"more than {MAX_DEPTH} levels",),
    ),
    "duplicate-key": (
        (VALID_YAML + "spec: {model: {source: other}}\n").encode(),
        ("'spec' appears twice", f"line {LINES + 1}", f"first on line {SPEC_LINE}"),
    ),
    "nested-duplicate-key": (
        b"metadata:\n  name: a\n  labels: {x: '1', x: '2'}\n",
        ("'x' appears twice", "line 3"),
    ),
    "alias-bomb": (billion_laughs().encode(), (f"more than {MAX_VALUES} values", "aliases")),
    "recursive-alias": (
        (VALID_YAML + "status: &loop {again: *loop}\n").encode(),
        ("refers to itself", f"line {LINES + 1}"),
    ),
    "huge-integer": (
        ("metadata: {name: x}\nspec: {psft: {seed: " + "9" * 5000 + "}}\n").encode(),
        ("line 2", "!!int"),
    ),
    "impossible-date": (b"metadata: {name: x, created: 2024-13-45}\n", ("line 1", "timestamp")),
    "bad-tag": (b"spec: {psft: {seed: !!int twelve}}\n", ("line 1", "'twelve'")),
    "python-tag": (b"spec: !!python/object:os.system {}\n", ("not valid YAML", "line 1")),
    "control-character": (b"metadata: {name: \x07}\n", ("not valid YAML", "line 1", "#x0007")),
    "two-documents": ((VALID_YAML + "---\n" + VALID_YAML).encode(), ("single document",)),
    "too-big": (
        (VALID_YAML + "#" * MAX_SPEC_BYTES).encode(),
        ("larger than 1 MiB", "the limit for a PSFTJob file"),
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(BAD_CONTENT))
@pytest.mark.parametrize("command", ["validate", "run", "render"])
def test_a_bad_spec_file_is_one_clear_line_and_exit_2(
    name: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, expected = BAD_CONTENT[name]
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    code, err = cli(capsys, command, str(path))
    assert code == 2, err[:2000]
    assert_one_clear_line(err, path, f"psft {command}: error:", *expected)
    assert not (tmp_path / "runs").exists()


JSON_CONTENT: dict[str, tuple[str, tuple[str, ...]]] = {
    "syntax": ('{"metadata": ', ("not valid JSON", "line 1")),
    "duplicate-key": ('{"spec": {}, "spec": {}}', ("'spec' appears twice",)),
    "deep": ('{"spec": ' + "[" * 100_000 + "]" * 100_000 + "}", (f"more than {MAX_DEPTH}",)),
    "moderately-deep": ('{"status": ' + "[" * 500 + "]" * 500 + "}", (f"more than {MAX_DEPTH}",)),
    "huge-integer": ('{"spec": {"psft": {"seed": ' + "9" * 5000 + "}}}", ("not valid JSON",)),
}


@pytest.mark.parametrize("name", list(JSON_CONTENT))
def test_a_bad_json_spec_is_one_clear_line_and_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, expected = JSON_CONTENT[name]
    path = tmp_path / "job.json"
    path.write_text(content)
    code, err = cli(capsys, "validate", str(path))
    assert code == 2, err[:2000]
    assert_one_clear_line(err, path, *expected)


def _unreadable_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a-file.yaml").write_text(VALID_YAML)
    (tmp_path / "loop-a.yaml").symlink_to(tmp_path / "loop-b.yaml")
    (tmp_path / "loop-b.yaml").symlink_to(tmp_path / "loop-a.yaml")
    return {
        "missing": (tmp_path / "missing.yaml", "no such file; check the path"),
        "folder": (tmp_path, "is a folder; give the path of a PSFTJob"),
        "under-a-file": (tmp_path / "a-file.yaml" / "job.yaml", "is a file, not a folder; check"),
        "symlink-loop": (tmp_path / "loop-a.yaml", "symbolic links; check the path"),
        "name-too-long": (tmp_path / ("j" * 300 + ".yaml"), "name too long; check the path"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "folder", "under-a-file", "symlink-loop", "name-too-long"]
)
@pytest.mark.parametrize("command", ["validate", "run", "render"])
def test_an_unreadable_spec_file_is_one_clear_line_and_exit_2(
    case: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, expected = _unreadable_paths(tmp_path)[case]
    code, err = cli(capsys, command, str(path))
    assert code == 2, err
    assert_one_clear_line(err, path, "cannot read file", expected)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EACCES, "permission denied; make it readable"),
        (errno.EPERM, "permission denied; make it readable"),
        (errno.ENOENT, "no such file; check the path"),
        (errno.EISDIR, "is a folder; give the path of a PSFTJob"),
        (errno.EIO, "input/output error; check the path"),
    ],
)
def test_os_errors_are_described_with_a_fix(code: int, expected: str) -> None:
    assert expected in describe_os_error(OSError(code, os.strerror(code)))


def test_validate_exits_2_when_any_file_is_unreadable_and_still_checks_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID_YAML)
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(VALID_YAML.replace("demo", "Not_A_Name"))
    code = main(["validate", str(good), str(tmp_path / "missing.yaml"), str(invalid)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "valid PSFTJob 'demo'" in out
    assert "missing.yaml: cannot read file" in err and "metadata.name" in err


def test_field_errors_still_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(VALID_YAML.replace("demo", "Not_A_Name"))
    code, err = cli(capsys, "validate", str(path))
    assert code == 1 and "metadata.name" in err


def test_merge_keys_and_a_few_aliases_are_still_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "metadata: {name: demo}\n"
        "spec:\n"
        "  model: {source: smollm2-135m-instruct}\n"
        "  dataset: {train: &files [a.jsonl, b.jsonl]}\n"
        "  grpo: {prompts: *files}\n"
        "  psft: &sizes {batchSize: 8, miniBatchSize: 4}\n"
        "  eval: {<<: {samples: 2, limit: 3}, samples: 4}\n"
    )
    assert cli(capsys, "validate", str(path))[0] == 0


def test_the_status_of_a_local_spec_is_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(VALID_YAML + "status: not a mapping, as the operator would write\n")
    code, err = cli(capsys, "validate", str(path))
    assert code == 0, err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        (b"\x00\x01binary", "binary file"),
        (b"{not json", "not valid JSON"),
        (b'{"stage": "train"}', "not a stage config"),
    ],
)
def test_a_bad_stage_config_is_one_clear_line_and_exit_2(
    content: bytes | None, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stage.json"
    if content is not None:
        path.write_bytes(content)
    code, err = cli(capsys, "train", "--config", str(path))
    assert code == 2, err
    assert_one_clear_line(err, path, "psft train: error:", expected)
