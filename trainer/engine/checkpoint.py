"""Resumable training state: model, optimizer, scheduler, RNG and data position.

A checkpoint folder is a complete Hugging Face model folder (safetensors + tokenizer, so
evaluation can load it directly) plus the files below. The run store publishes the folder
and then moves the `latest` marker (see psft.trainer.storage).
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from psft.workflows.errors import UserError, shown

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"


@dataclass
class TrainState:
    step: int = 0
    """Completed training steps."""
    total_steps: int = 0
    tokens: int = 0
    """Response tokens trained on so far."""
    elapsed_s: float = 0.0
    """Training wall time so far (earlier attempts included)."""
    data_fingerprint: str = ""
    objective: str = "psft"
    last_record: dict[str, Any] = field(default_factory=dict)


def data_fingerprint(examples: Sequence[Any]) -> str:
    """Identity of the prepared training data: ids and token counts, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.id}\x00{len(e.input_ids)}\x00{e.response_start}\n".encode())
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj: Any, path: Path) -> None:
    # through a Python file: a full disk then surfaces as OSError(ENOSPC) in the chain,
    # where torch's own writer only says "unexpected pos"
    with path.open("wb") as f:
        torch.save(obj, f)


def save_checkpoint(
    folder: Path,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    _torch_save(optimizer.state_dict(), folder / OPTIMIZER)
    _torch_save(scheduler.state_dict(), folder / SCHEDULER)
    _torch_save(rng_state(), folder / RNG)
    # written last: a folder with trainer_state.json is complete
    (folder / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")


# reading one back ------------------------------------------------------------------------------


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; `problem` names the file and what is wrong."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message


_STATE_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "step": ((int,), "a whole number"),
    "total_steps": ((int,), "a whole number"),
    "tokens": ((int,), "a whole number"),
    "elapsed_s": ((int, float), "a number"),
    "data_fingerprint": ((str,), "text"),
    "objective": ((str,), "text"),
    "last_record": ((dict,), "an object"),
}


def read_train_state(folder: Path) -> TrainState:
    """trainer_state.json of a checkpoint, every field checked (CheckpointError otherwise)."""
    from psft.trainer.model import read_json_file

    path = folder / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", f"{path} is missing")
    data, problem = read_json_file(path)
    if problem is None and not isinstance(data, dict):
        problem = "is not a JSON object"
    if problem is None:
        unknown = sorted(set(data) - set(_STATE_TYPES))
        if unknown:
            problem = f"has fields psft does not write: {', '.join(unknown)}"
    if problem is None and "step" not in data:
        problem = "has no step"
    if problem is None:
        for key, (types, kind) in _STATE_TYPES.items():
            value = data.get(key)
            if key in data and (isinstance(value, bool) or not isinstance(value, types)):
                problem = f"has {key} = {shown(value)}, not {kind}"
                break
            if isinstance(value, int | float) and value < 0:
                problem = f"has a negative {key} ({value})"
                break
    if problem is not None:
        raise CheckpointError(f"{path} {problem}", f"{path} {problem}")
    return TrainState(**data)


def _torch_file_problem(
    path: Path, expect: Callable[[Any], bool], weights_only: bool
) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    if not zipfile.is_zipfile(path):
        return f"{path} is not a complete PyTorch archive (it is truncated or damaged)"
    try:
        # mmap: the tensors stay on disk; this checks the archive and its index, not reads it
        value = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as exc:  # torch raises several types for damaged archives
        from psft.trainer.model import one_line

        return f"{path} is truncated or damaged ({type(exc).__name__}: {one_line(exc)})"
    if not expect(value):
        return f"{path} does not hold what psft saves there"
    return None


def checkpoint_problem(folder: Path, step: int | None = None) -> str | None:
    """What keeps `folder` from being a complete checkpoint to resume from, or None.

    Checked without loading the model: trainer_state.json field by field, the optimizer,
    scheduler and RNG archives (indexes only), the model's config, weights headers and
    tokenizer (psft.trainer.model.model_folder_problem)."""
    from psft.trainer.model import model_folder_problem

    if not folder.is_dir():
        return f"{folder} does not exist"
    try:
        state = read_train_state(folder)
    except CheckpointError as exc:
        return exc.problem
    if step is not None and state.step != step:
        return f"{folder / TRAINER_STATE} is of step {state.step}, not {step}"
    checks: tuple[tuple[str, Callable[[Any], bool], bool], ...] = (
        (OPTIMIZER, lambda v: isinstance(v, dict) and {"state", "param_groups"} <= set(v), True),
        (SCHEDULER, lambda v: isinstance(v, dict), False),
        (RNG, lambda v: isinstance(v, dict) and {"python", "torch"} <= set(v), False),
    )
    for name, expect, weights_only in checks:
        problem = _torch_file_problem(folder / name, expect, weights_only)
        if problem:
            return problem
    return model_folder_problem(folder)


def load_checkpoint(
    folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any, device: str
) -> TrainState:
    """Restore optimizer, scheduler and RNG from `folder` (the model loads separately).

    CheckpointError names the file that cannot be restored (call `checkpoint_problem`
    first: it finds damaged files without loading the model)."""
    state = read_train_state(folder)
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        (
            OPTIMIZER,
            lambda: optimizer.load_state_dict(
                torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
            ),
        ),
        (
            SCHEDULER,
            lambda: scheduler.load_state_dict(torch.load(folder / SCHEDULER, weights_only=False)),
        ),
        (RNG, lambda: restore_rng(torch.load(folder / RNG, weights_only=False))),
    )
    for name, restore in steps:
        try:
            restore()
        except Exception as exc:  # damaged, or written for another model or optimizer
            from psft.trainer.model import one_line

            problem = (
                f"{folder / name} cannot be restored: it does not belong to this model and "
                f"optimizer, or is damaged ({type(exc).__name__}: {one_line(exc)})"
            )
            raise CheckpointError(problem, problem) from exc
    return state
