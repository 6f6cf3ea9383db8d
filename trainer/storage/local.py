"""Local storage: the run root is a folder, and the store works in it directly."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from psft.trainer.storage.base import (
    STEP_DIR,
    CheckpointFolders,
    MissingArtifact,
    StorageError,
    marker_body,
    parse_marker,
    prune_step_folders,
    validate_key,
)
from psft.workflows import layout


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fsync_tree(path: Path) -> None:
    """Flush every file of a folder to disk (a committed checkpoint survives a power cut)."""
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalRunStore(CheckpointFolders):
    """A run stored in a local folder (the default for `psft run`)."""

    def __init__(self, root: Path, *, keep_checkpoints: int = 2) -> None:
        self.work_dir = Path(root).expanduser().resolve()
        self.keep_checkpoints = keep_checkpoints
        self.work_dir.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> str:
        return str(self.work_dir)

    def __repr__(self) -> str:
        return f"LocalRunStore({self.root!r})"

    def local_path(self, key: str) -> Path:
        return self.work_dir / validate_key(key)

    def pull(self, key: str) -> Path:
        path = self.local_path(key)
        if not path.exists():
            raise MissingArtifact(
                f"{key} is missing from the run at {self.root} (expected {path}); "
                "run the stage that produces it first"
            )
        return path

    def push(self, key: str) -> None:
        path = self.local_path(key)
        if not path.exists():
            raise MissingArtifact(f"cannot publish {key}: {path} does not exist")

    def exists(self, key: str) -> bool:
        return self.local_path(key).exists()

    def folders(self, key: str) -> list[str]:
        path = self.local_path(key)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    def remove(self, key: str) -> None:
        shutil.rmtree(self.local_path(key), ignore_errors=True)

    def commit_checkpoint(self, stage: str, step: int) -> None:
        folder = self.local_path(layout.checkpoint(stage, step))
        if not folder.is_dir() or not any(folder.iterdir()):
            raise StorageError(
                f"cannot commit checkpoint {step} of {stage}: {folder} is missing or empty"
            )
        fsync_tree(folder)
        write_atomic(self.local_path(layout.latest_marker(stage)), marker_body(step))
        self._prune(stage, step)

    def latest_checkpoint(self, stage: str) -> int | None:
        marker = self.local_path(layout.latest_marker(stage))
        try:
            body = marker.read_bytes()
        except FileNotFoundError:
            return None
        return parse_marker(body, str(marker))

    def _prune(self, stage: str, latest: int) -> None:
        prune_step_folders(self, layout.checkpoints(stage), STEP_DIR, latest, self.keep_checkpoints)
