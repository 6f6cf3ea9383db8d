"""verl checkpoints in the run's storage: which files a process owns, and the world-size rule.

verl's FSDP engine writes one model, optimizer and extra-state shard per training process
(`model_world_size_{W}_rank_{r}.pt`, ...) plus files of rank 0 (`huggingface/`,
`fsdp_config.json`); a checkpoint only loads into the same number of processes. On Ray the
workers push their own files straight from their nodes, the driver adds the data-loader
state, then `psft_checkpoint.json` (step, world size, every file) and last verl's tracker
file naming the step: a checkpoint is complete once the tracker names it, so a run lost
mid-save resumes from the one before. verl prunes old step folders on the node's disk
(`keepCheckpoints`); prune_store removes the same from the run's storage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from psft.trainer.storage.base import StorageError, prune_step_folders
from psft.workflows.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
"""verl's file naming the last complete step (verl.utils.checkpoint.checkpoint_manager)."""
METADATA = "psft_checkpoint.json"
RANK_FILE = re.compile(r"_world_size_(\d+)_rank_(\d+)\.")


STEP_FOLDER = re.compile(r"global_step_(\d+)")


def step_folder(step: int) -> str:
    return f"global_step_{step}"


def prune_store(store: Any, key: str, latest: int, keep: int | None) -> list[int]:
    """verl prunes its old step folders on the node's disk only: remove the same from the
    run's storage (all but the `keep` newest at or below `latest`, the tracker's step; a
    folder above it is an upload in progress). The steps removed."""
    if not keep or keep <= 0:  # verl's "keep all"
        return []
    return prune_step_folders(store, key, STEP_FOLDER, latest, keep)


def prune_store_or_warn(store: Any, key: str, latest: int, keep: int | None) -> None:
    """prune_store after a complete checkpoint: a failure leaves the checkpoint safe, and
    the next save prunes again, so it is a warning."""
    try:
        gone = prune_store(store, key, latest, keep)
    except StorageError as exc:
        print(f"warning: pruning old checkpoints in {store.root}/{key} failed: {exc}", flush=True)
        return
    if gone:
        print(f"removed checkpoints of steps {gone} from {store.root}/{key}", flush=True)


def owned_by(rel: str, rank: int) -> bool:
    """Whether process `rank` uploads (and, on resume, downloads) file `rel` of a checkpoint
    folder: its own shards; rank 0 also the files of no rank. Every rank downloads those."""
    match = RANK_FILE.search(rel)
    if match is None:
        return rank == 0
    return int(match.group(2)) == rank


def needed_by(rel: str, rank: int) -> bool:
    match = RANK_FILE.search(rel)
    return match is None or int(match.group(2)) == rank


def files_of(folder: Path, rank: int) -> list[str]:
    """Relative paths (posix) of the files in `folder` that process `rank` owns."""
    if not folder.is_dir():
        return []
    names = (p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file())
    return [n for n in names if owned_by(n, rank) and not n.startswith("data_")]


def metadata(step: int, world_size: int, files: list[str]) -> dict[str, Any]:
    return {"step": step, "world_size": world_size, "files": sorted(set(files))}


def parse_metadata(text: str, where: str) -> dict[str, Any]:
    """A checkpoint's psft_checkpoint.json, checked: a damaged one is a clear error."""
    try:
        meta = json.loads(text)
        world = int(meta["world_size"])
        files = meta.get("files")
        if world < 1 or not (files is None or isinstance(files, list)):
            raise ValueError("world_size below 1, or files not a list")
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(
            f"{where}: not a checkpoint record psft wrote ({type(exc).__name__}: {exc}); "
            "delete that checkpoint folder (training resumes from the one before) or start "
            "over with psft run --fresh"
        ) from None
    return {"world_size": world, "files": files}


def world_size_of(folder: Path) -> int | None:
    """The number of processes that wrote the checkpoint in `folder` (its metadata, or the
    shard names of a one-node checkpoint), None if it says nothing."""
    meta = folder / METADATA
    if meta.is_file():
        return parse_metadata(meta.read_text(), str(meta))["world_size"]
    sizes = {int(m.group(1)) for p in folder.glob("*.pt") if (m := RANK_FILE.search(p.name))}
    return max(sizes) if sizes else None


def read_tracker(checkpoint_dir: Path) -> int | None:
    tracker = checkpoint_dir / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else None


def check_world_size(
    written: int | None, step: int, world: int, nodes: int, per_node: int, where: str
) -> None:
    """A checkpoint of `written` processes cannot resume in `world` = nodes x per_node."""
    if written is None or written == world:
        return
    field = "spec.resources.nodes" if written % per_node == 0 else "spec.resources.gpusPerNode"
    raise UserError(
        f"{field}: the last complete checkpoint (step {step}, {where}) was written by "
        f"{written} training processes, and this run has {world} ({nodes} node(s) x "
        f"{per_node} per node); verl checkpoints only resume with the same number of "
        f"processes. Set spec.resources.nodes and gpusPerNode back so that nodes x "
        f"gpusPerNode = {written}, or start the train stage over without its checkpoints "
        f"(`psft run --fresh`, or delete {where})"
    )
