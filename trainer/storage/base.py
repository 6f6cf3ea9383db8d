"""The storage interface every stage uses: `RunStore`, its errors, and shared rules.

A run's artifacts live under one root (a local folder, or `s3://bucket/prefix/...`) and
are addressed by relative keys from `psft.workflows.layout`. A store keeps a local mirror
of that root (`work_dir`): stages read and write plain files there, `pull` makes a key
present locally and `push` publishes it.

Checkpoints follow the marker protocol: `<stage>/checkpoints/step-N/` is written first,
then the `latest` marker naming N is replaced atomically. Readers trust only the marker,
so a crash between the files and the marker leaves the previous checkpoint in force.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

from psft.workflows import layout
from psft.workflows.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = ".psft-manifest.json"
"""Written last into every folder a store pushes: the files, sizes and ETags it holds."""


class StorageError(UserError):
    """Storage cannot be used as configured; the message says what to fix."""


class MissingArtifact(StorageError):
    """A key that a stage needs is not in the run's storage."""


class DiskFull(StorageError):
    """No space left on the device a stage writes to; the message says where and what now."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
_WRITE_FAILED_TEXT = ("unexpected pos", "file write failed", "iostream", "PytorchStreamWriter")
NEARLY_FULL_BYTES = 64 << 10
"""Free space below which a failed write is taken for a full disk (torch's own writer
reports one as "unexpected pos", with no errno)."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc` (or an error it came from) is a write that failed for lack of space."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
    writing = isinstance(exc, OSError) or (
        isinstance(exc, RuntimeError) and any(t in str(exc) for t in _WRITE_FAILED_TEXT)
    )
    if where is not None and writing:
        free = free_bytes(Path(where))
        return free is not None and free < NEARLY_FULL_BYTES
    return False


def failed_file(exc: BaseException) -> str | None:
    """The file a failed write named, when the error says."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
    return None


def disk_full_message(exc: BaseException, where: Path, doing: str, then: str) -> str:
    file = failed_file(exc)
    writing = f" (writing {file})" if file else ""
    return (
        f"the disk is full: no space left on the device holding {where}{writing} while "
        f"{doing}; {then}"
    )


@contextmanager
def disk_full_is_an_error(where: Path, doing: str, then: str) -> Iterator[None]:
    """A write that fails for lack of space becomes DiskFull (one paragraph, exit code 2)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if is_disk_full(exc, where):
            raise DiskFull(disk_full_message(exc, where, doing, then)) from exc
        raise


@runtime_checkable
class RunStore(Protocol):
    """Where a run's artifacts live. Keys are relative to the run root."""

    work_dir: Path
    """Local mirror of the run root (the run root itself for local storage)."""

    @property
    def root(self) -> str:
        """The run root as configured: a folder or an s3:// URI (for messages)."""
        ...

    def local_path(self, key: str) -> Path:
        """Where `key` lives (or will live) in `work_dir`; nothing is transferred."""
        ...

    def pull(self, key: str) -> Path:
        """Make file or folder `key` present locally and return its path."""
        ...

    def push(self, key: str) -> None:
        """Publish the local file or folder `key` (no-op for local storage)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether file or folder `key` exists in the run's storage."""
        ...

    def folders(self, key: str) -> list[str]:
        """Names of the folders directly inside folder `key` in the run's storage."""
        ...

    def remove(self, key: str) -> None:
        """Delete folder `key` from the run's storage and the local mirror."""
        ...

    def checkpoint_dir(self, stage: str, step: int) -> Path:
        """An empty local folder for checkpoint `step` of `stage` (stale files removed)."""
        ...

    def commit_checkpoint(self, stage: str, step: int) -> None:
        """Publish checkpoint `step`, then atomically point the `latest` marker at it."""
        ...

    def latest_checkpoint(self, stage: str) -> int | None:
        """Step named by the `latest` marker of `stage`, or None before the first commit."""
        ...


class CheckpointFolders:
    """Shared by the stores: checkpoints are written into the local mirror first."""

    def local_path(self, key: str) -> Path:
        raise NotImplementedError

    def checkpoint_dir(self, stage: str, step: int) -> Path:
        path = self.local_path(layout.checkpoint(stage, step))
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def marker_body(step: int) -> bytes:
    return (json.dumps({"step": step, "checkpoint": f"step-{step}"}) + "\n").encode()


def parse_marker(body: bytes, where: str) -> int:
    """The step a `latest` marker names; a clear error for a damaged marker."""
    try:
        data = json.loads(body.decode())
        step = int(data["step"]) if isinstance(data, dict) else int(data)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise StorageError(
            f"{where} is not a valid checkpoint marker ({exc}); delete it to start the stage "
            'from scratch, or write {"step": N} naming a complete checkpoint'
        ) from exc
    if step < 0:
        raise StorageError(f"{where} names a negative step ({step})")
    return step


def checkpoint_steps(names: list[str]) -> list[int]:
    """Step numbers of the `step-N` entries among `names`, ascending."""
    return sorted(int(m.group(1)) for n in names if (m := STEP_DIR.match(n)))


def prune_step_folders(
    store: RunStore, key: str, pattern: re.Pattern[str], latest: int, keep: int
) -> list[int]:
    """Remove from `store` the step folders inside folder `key` (named by `pattern`, whose
    group 1 is the step) that steps_to_prune picks; the steps removed."""
    folders = {int(m.group(1)): n for n in store.folders(key) if (m := pattern.fullmatch(n))}
    gone = steps_to_prune(sorted(folders), latest, keep)
    for step in gone:
        store.remove(f"{key}/{folders[step]}")
    return gone


def steps_to_prune(steps: list[int], latest: int, keep: int) -> list[int]:
    """Checkpoints to delete: all but the `keep` newest at or below the marker's step.

    Steps above the marker are left alone: they belong to an upload in progress (or a
    crashed one that the next save of that step overwrites).
    """
    committed = sorted(s for s in steps if s <= latest)
    kept = set(committed[-max(keep, 1) :]) | {latest}
    return [s for s in committed if s not in kept]


def validate_key(key: str) -> str:
    """A relative key without '..' or a leading '/', normalised (no trailing '/')."""
    norm = key.strip().strip("/")
    parts = norm.split("/")
    if not norm or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid artifact key {key!r}: use a relative path like 'train/final'")
    return norm


def checkpoints_key(stage: str) -> str:
    return layout.checkpoints(stage)
