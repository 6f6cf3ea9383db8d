"""Local run folders: psft writes into, and deletes from, only folders it created.

A run folder is recognised by the marker file `.psft-run` written when psft creates it
(runs made before the marker existed are recognised by their `spec.yaml`, which carries
psft's spec-digest annotation, and get the marker on their next use). A folder that is
neither empty nor marked is somebody else's: psft refuses it instead of writing into it
or, with `--fresh`, deleting it. `--fresh` removes only the entries psft itself writes
into a run folder; anything a user put beside them stays.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from psft.workflows import layout
from psft.workflows.errors import UserError
from psft.workflows.pipeline import COMPARE_ARM
from psft.workflows.spec_file import SpecFileError, read_document

MARKER = ".psft-run"
STAGES_DIR = "stages"
DIGEST_ANNOTATION = "psft.dev/spec-digest"

# Top-level entries psft creates in a run folder (layout's keys and the executor's own).
ARM_TRAIN = f"train-{COMPARE_ARM}"
OWN_ENTRIES = (
    "data", "train", "grpo", "eval", "eval-grpo", ARM_TRAIN, layout.eval_dir(ARM_TRAIN),
    "report", STAGES_DIR,
)  # fmt: skip
OWN_FILES = (layout.SPEC, layout.SUMMARY)


def spec_digest_in(spec_file: Path) -> str | None:
    """The spec digest psft wrote into a run's spec.yaml; None when there is none, or the
    file is not one psft could have written (read with the bounded loader: a run folder may
    hold anything)."""
    try:
        doc = read_document(spec_file)
    except SpecFileError:
        return None
    metadata = doc.get("metadata") if isinstance(doc, dict) else None
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    digest = annotations.get(DIGEST_ANNOTATION) if isinstance(annotations, dict) else None
    return digest if isinstance(digest, str) else None


def _is_legacy_run(path: Path) -> bool:
    spec = path / layout.SPEC
    return spec.is_file() and spec_digest_in(spec) is not None


def is_run_folder(path: Path) -> bool:
    return (path / MARKER).is_file() or _is_legacy_run(path)


def _check_claimable(path: Path, job_name: str) -> None:
    try:
        _refuse_foreign(path, job_name)
    except OSError as exc:  # a parent folder psft may not search, a name too long, ...
        raise UserError(f"cannot use run folder {path}: {exc.strerror or exc}") from None


def _refuse_foreign(path: Path, job_name: str) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(
            f"run folder {path} exists and is not a folder; choose another --runs-dir or "
            "spec.storage.local.path, or another metadata.name"
        )
    if path.is_dir() and any(path.iterdir()) and not is_run_folder(path):
        raise UserError(
            f"{path} is not empty and holds no psft run (no {MARKER} file), so psft will "
            f"neither write into it nor delete it. Choose another --runs-dir or "
            f"spec.storage.local.path (the run of job {job_name!r} goes to <that folder>/"
            f"{job_name}), or another metadata.name"
        )


def _remove_own_entries(path: Path) -> None:
    for name in OWN_ENTRIES:
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    for name in OWN_FILES:
        (path / name).unlink(missing_ok=True)


def claim(path: Path, job_name: str, *, fresh: bool) -> Path:
    """Create or reuse the run folder `path` for `job_name`; with `fresh`, discard psft's
    earlier outputs in it first. Refuses (UserError) any folder psft did not create."""
    _check_claimable(path, job_name)
    if fresh and path.is_dir():
        _remove_own_entries(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / STAGES_DIR).mkdir(exist_ok=True)
        marker = path / MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"job": job_name}) + "\n")
    except OSError as exc:
        raise UserError(f"cannot create run folder {path}: {exc.strerror or exc}") from None
    return path
