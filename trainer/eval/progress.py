"""Generation progress of the eval stage: a live bar on a terminal, plain lines in logs.

Generating k samples for each problem of a benchmark takes minutes (hours on a CPU), so
the eval stage shows how far it is while the backend generates:

    [eval] aime24: 12/30 problems, 390/960 samples | elapsed 1:02 | eta 1:33

Backends report totals (problems whose k samples are all done, samples done) through
`GenerationProgress.__call__`; the transformers backend as sequences reach EOS within a
batch, the vLLM adapter as vLLM finishes requests. On a terminal (and with progress on)
a rich bar redraws in place; otherwise a plain line is printed when there is news and at
least `interval` seconds passed since the last one, a heartbeat line when nothing arrived
for `interval` seconds (so a long first batch is not silent), and always the last line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

from psft.trainer.engine.progress import clock_text, live_bar

DEFAULT_INTERVAL = 15.0
"""Seconds between plain lines (pod logs)."""


class GenerationProgress:
    """Progress of one benchmark's generation.

    with GenerationProgress("aime24", problems=30, samples_per_problem=32) as progress:
        backend.generate(prompts, sampling, progress)
    """

    def __init__(
        self,
        benchmark: str,
        problems: int,
        samples_per_problem: int,
        *,
        live: bool = False,
        stream: TextIO | None = None,
        prefix: str = "[eval] ",
        interval: float = DEFAULT_INTERVAL,
        heartbeat: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.benchmark = benchmark
        self.problems = problems
        self.total_samples = problems * samples_per_problem
        self.stream = stream or sys.stderr
        self.live = live and _isatty(self.stream)
        self.prefix = prefix
        self.interval = interval
        self.heartbeat = heartbeat
        self.clock = clock
        self.done_problems = 0
        self.done_samples = 0
        self.lines: list[str] = []
        """Every plain line printed (for logs and tests)."""
        self._start = clock()
        self._last_print: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._task: Any = None

    # reporting -------------------------------------------------------------------------
    def __call__(self, prompts: int, samples: int | None = None) -> None:
        """Totals so far: `prompts` problems with all their samples, `samples` samples."""
        with self._lock:
            k = self.total_samples // max(self.problems, 1)
            samples = prompts * k if samples is None else samples
            news = (prompts, samples) != (self.done_problems, self.done_samples)
            self.done_problems = min(max(prompts, self.done_problems), self.problems)
            self.done_samples = min(max(samples, self.done_samples), self.total_samples)
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done_samples, info=self._counts())
                return
            now = self.clock()
            finished = self.done_samples >= self.total_samples
            due = self._last_print is None or now - self._last_print >= self.interval
            if news and (finished or due):
                self._print(now)

    def tick(self) -> None:
        """Heartbeat: a plain line when none was printed for `interval` seconds."""
        with self._lock:
            if self._bar is not None or self.done_samples >= self.total_samples:
                return
            now = self.clock()
            since = now - (self._last_print if self._last_print is not None else self._start)
            if since >= self.interval:
                self._print(now)

    # text ------------------------------------------------------------------------------
    def _counts(self) -> str:
        return (
            f"{self.done_problems}/{self.problems} problems, "
            f"{self.done_samples}/{self.total_samples} samples"
        )

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the rate so far (None before the first sample is done)."""
        now = self.clock() if now is None else now
        if self.done_samples <= 0:
            return None
        elapsed = now - self._start
        return elapsed / self.done_samples * (self.total_samples - self.done_samples)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        eta = self.eta(now)
        return (
            f"{self.benchmark}: {self._counts()} | elapsed {clock_text(now - self._start)} | "
            f"eta {'?' if eta is None else clock_text(eta)}"
        )

    def _print(self, now: float) -> None:
        text = self.line(now)
        self.lines.append(text)
        self._last_print = now
        print(f"{self.prefix}{text}", file=self.stream, flush=True)

    # lifetime --------------------------------------------------------------------------
    def __enter__(self) -> GenerationProgress:
        self._start = self.clock()
        if self.live:
            self._bar = live_bar(self.benchmark, self.stream, counts=False)
            self._bar.start()
            self._task = self._bar.add_task(
                self.benchmark, total=max(self.total_samples, 1), info=self._counts()
            )
        elif self.heartbeat:
            self._thread = threading.Thread(
                target=self._beat, name=f"eval-progress-{self.benchmark}", daemon=True
            )
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(min(self.interval, 5.0)):
            self.tick()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
