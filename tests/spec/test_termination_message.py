"""A failed stage's one-line error goes to the container's termination message, where
Kubernetes, Argo (the step's message) and the operator (PSFTJob status) read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from psft.workflows.cli import TERMINATION_MESSAGE_MAX, main


def test_a_stage_error_is_the_termination_message(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "termination-log"
    log.write_bytes(b"")  # the kubelet's bind mount exists before the process starts
    monkeypatch.setenv("PSFT_TERMINATION_LOG", str(log))
    assert main(["prepare", "--config", str(tmp_path / "missing.json")]) == 2
    message = log.read_text()
    assert message.startswith("psft prepare: error: ")
    assert "missing.json" in message and "\n" not in message.strip()


def test_nothing_is_written_outside_a_container(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "termination-log"  # not there: not a pod
    monkeypatch.setenv("PSFT_TERMINATION_LOG", str(log))
    assert main(["prepare", "--config", str(tmp_path / "missing.json")]) == 2
    assert not log.exists()


def test_the_message_fits_what_the_kubelet_keeps(tmp_path: Path, monkeypatch) -> None:
    from psft.workflows.cli import write_termination_message

    log = tmp_path / "termination-log"
    log.write_bytes(b"")
    monkeypatch.setenv("PSFT_TERMINATION_LOG", str(log))
    write_termination_message("x" * 10_000)
    assert len(log.read_bytes()) == TERMINATION_MESSAGE_MAX


@pytest.mark.parametrize("command", ["train", "eval", "report"])
def test_every_stage_command_writes_it(tmp_path: Path, monkeypatch, command: str) -> None:
    log = tmp_path / "termination-log"
    log.write_bytes(b"")
    monkeypatch.setenv("PSFT_TERMINATION_LOG", str(log))
    assert main([command, "--config", str(tmp_path / "nope.json")]) == 2
    assert log.read_text().startswith(f"psft {command}: error: ")


def test_an_unexpected_error_names_its_type_and_still_raises(tmp_path: Path, monkeypatch) -> None:
    """A traceback (a bug, a library's RuntimeError) exits 1 with the traceback on stderr,
    and the status still says what it was instead of only "exit code 1"."""
    import psft.workflows.cli as cli

    log = tmp_path / "termination-log"
    log.write_bytes(b"")
    monkeypatch.setenv("PSFT_TERMINATION_LOG", str(log))

    def boom(args) -> int:
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for action in parser._subparsers._group_actions[0].choices.values():  # every command
        action.set_defaults(func=boom)
    with pytest.raises(RuntimeError):
        main(["report", "--config", str(tmp_path / "c.json")])
    assert log.read_text() == (
        "psft report: unexpected RuntimeError: CUDA error: an illegal memory access was "
        "encountered (the traceback is in the container's log)"
    )
