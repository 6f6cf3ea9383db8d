"""Step progress for humans: a live rich bar on a terminal, plain lines in logs."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO


def clock_text(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on."""
    seconds = max(int(seconds), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_line(record: dict[str, Any], eta_s: float | None) -> str:
    parts = [
        f"step {record['step']}/{record['total_steps']}",
        f"loss {record['loss']:.4f}",
        f"entropy {record['entropy']:.4f}",
        f"clip {record['clip_fraction']:.3f}",
        f"lr {record['learning_rate']:.2e}",
        f"{record['tokens_per_second']:.0f} tok/s",
    ]
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f}")
    if eta_s is not None:
        parts.append(f"eta {clock_text(eta_s)}")
    return " | ".join(parts)


def live_bar(label: str, stream: TextIO, *, counts: bool) -> Any:
    """A rich progress bar on `stream`: label, bar, [done/total], the task's `info` field,
    elapsed and remaining time (training steps here, eval samples in eval.progress)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(f"[bold]{label}"), BarColumn()]
    if counts:
        columns.append(MofNCompleteColumn())
    columns += [
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=Console(file=stream))


class StepProgress:
    """`with StepProgress(total, start, live=True) as p: p.update(record)`."""

    def __init__(
        self, total: int, start: int = 0, *, live: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.start = start
        self.stream = stream or sys.stdout
        self.live = live and self.stream.isatty()
        self._t0 = time.monotonic()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> StepProgress:
        if self.live:
            self._progress = live_bar("train", self.stream, counts=True)
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.total, completed=self.start, info="starting"
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, record: dict[str, Any]) -> None:
        done = record["step"] - self.start
        remaining = self.total - record["step"]
        eta = (time.monotonic() - self._t0) / done * remaining if done > 0 else None
        if self._progress is not None:
            info = (
                f"loss {record['loss']:.4f} entropy {record['entropy']:.4f} "
                f"clip {record['clip_fraction']:.3f} {record['tokens_per_second']:.0f} tok/s"
            )
            if "val_loss" in record:
                info += f" val {record['val_loss']:.4f}"
            self._progress.update(self._task, completed=record["step"], info=info)
        else:
            print(step_line(record, eta), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)
