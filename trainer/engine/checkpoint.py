"""Resumable training state: model, optimizer, scheduler, RNG and data position.

A checkpoint folder is a complete Hugging Face model folder (safetensors + tokenizer, so
evaluation can load it directly) plus the files below. The run store publishes the folder
and then moves the `latest` marker (see psft.trainer.storage).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from psft.workflows.errors import UserError

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
    torch.save(optimizer.state_dict(), folder / OPTIMIZER)
    torch.save(scheduler.state_dict(), folder / SCHEDULER)
    torch.save(rng_state(), folder / RNG)
    # written last: a folder with trainer_state.json is complete
    (folder / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")


def load_checkpoint(
    folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any, device: str
) -> TrainState:
    """Restore optimizer, scheduler and RNG from `folder` (the model loads separately)."""
    missing = [n for n in (TRAINER_STATE, OPTIMIZER, SCHEDULER, RNG) if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); delete it and "
            "its `latest` marker to start over, or point the marker at an older checkpoint"
        )
    state = TrainState(**json.loads((folder / TRAINER_STATE).read_text()))
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER, map_location=device))
    scheduler.load_state_dict(torch.load(folder / SCHEDULER, weights_only=False))
    restore_rng(torch.load(folder / RNG, weights_only=False))
    return state
