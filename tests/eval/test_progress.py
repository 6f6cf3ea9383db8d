"""Eval progress (issue 15: the eval stage printed nothing for minutes while generating)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from psft.trainer.eval.progress import GenerationProgress, clock_text


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain(clock: Clock, **kw: Any) -> tuple[GenerationProgress, io.StringIO]:
    stream = io.StringIO()
    progress = GenerationProgress(
        "aime24", 30, 32, stream=stream, interval=15.0, heartbeat=False, clock=clock, **kw
    )
    return progress, stream


def test_plain_lines_carry_benchmark_counts_elapsed_and_eta() -> None:
    clock = Clock()
    progress, stream = plain(clock)
    with progress:
        clock.now += 62
        progress(12, 384)
    assert stream.getvalue() == (
        "[eval] aime24: 12/30 problems, 384/960 samples | elapsed 1:02 | eta 1:33\n"
    )


def test_plain_lines_are_rate_limited_and_the_last_is_always_printed() -> None:
    clock = Clock()
    progress, _ = plain(clock)
    with progress:
        for done in range(1, 31):  # one problem every 2 s for 60 s
            clock.now += 2
            progress(done, done * 32)
    # the first news, then at most one line per 15 s, then the end
    assert [line.split(" |")[0] for line in progress.lines] == [
        "aime24: 1/30 problems, 32/960 samples",
        "aime24: 9/30 problems, 288/960 samples",
        "aime24: 17/30 problems, 544/960 samples",
        "aime24: 25/30 problems, 800/960 samples",
        "aime24: 30/30 problems, 960/960 samples",
    ]
    assert progress.lines[-1].endswith("| elapsed 1:00 | eta 0:00")


def test_heartbeat_when_nothing_finishes_for_a_while() -> None:
    clock = Clock()
    progress, stream = plain(clock)
    with progress:
        clock.now += 10
        progress.tick()
        assert stream.getvalue() == ""  # not yet due
        clock.now += 6
        progress.tick()
        progress(0, 5)  # samples done, no problem complete yet: no line within 15 s
        clock.now += 16
        progress.tick()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[eval] aime24: 0/30 problems, 0/960 samples | elapsed 0:16 | eta ?",
        "[eval] aime24: 0/30 problems, 5/960 samples | elapsed 0:32 | eta 1:41:52",
    ]


def test_heartbeat_thread_prints_during_a_silent_generate() -> None:
    import time

    stream = io.StringIO()
    with GenerationProgress("amc23", 2, 4, stream=stream, interval=0.05) as progress:
        deadline = time.monotonic() + 5
        while not progress.lines and time.monotonic() < deadline:
            time.sleep(0.01)
    assert stream.getvalue().startswith("[eval] amc23: 0/2 problems, 0/8 samples | elapsed")


def test_live_bar_only_on_a_terminal() -> None:
    # progress on, but the stream is not a terminal (a pod log): plain lines
    clock = Clock()
    progress, stream = plain(clock, live=True)
    assert progress.live is False
    with progress:
        progress(30, 960)
    assert "30/30 problems" in stream.getvalue()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    with GenerationProgress("aime24", 2, 2, stream=terminal, live=True) as bar:
        assert bar.live
        bar(1, 2)
        bar(2, 4)
    assert "aime24" in terminal.getvalue() and not bar.lines


def test_clock_text() -> None:
    assert [clock_text(s) for s in (0, 59, 61, 3600, 3725)] == [
        "0:00",
        "0:59",
        "1:01",
        "1:00:00",
        "1:02:05",
    ]


def test_eval_stage_prints_generation_progress(
    trained_run: Path,
    make_job: Callable[..., Any],
    make_config: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The stage on the CPU transformers backend, progress off (a pod): plain lines."""
    from psft.trainer.eval import stage

    stage.run(make_config(make_job(samples=2, limit=2), trained_run))
    err = capsys.readouterr().err
    assert "[eval] aime24: generating 2 problems x 2 samples" in err
    final = re.search(
        r"\[eval\] aime24: 2/2 problems, 4/4 samples \| elapsed \d+:\d\d \| eta 0:00", err
    )
    assert final, err
    assert "[eval] aime24: grading 4 samples" in err
