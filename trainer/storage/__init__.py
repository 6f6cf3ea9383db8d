"""Run storage: one interface for local folders and S3 (MinIO, SeaweedFS, AWS).

store = open_run_store(config)          # from the stage config
data = store.pull(layout.DATA_TRAIN)     # local Path, downloaded if remote
ckpt = store.checkpoint_dir("train", 100)
...write files into ckpt...
store.commit_checkpoint("train", 100)    # upload, then the atomic `latest` marker
store.latest_checkpoint("train")         # -> 100 (trusts only the marker)
fetch_uri("s3://bucket/models/x")        # s3:// inputs, cached; local paths pass through
"""

from __future__ import annotations

from psft.trainer.storage.base import DiskFull, MissingArtifact, RunStore, StorageError
from psft.trainer.storage.local import LocalRunStore
from psft.trainer.storage.uri import fetch_uri
from psft.workflows.paths import PathProblem, local_path
from psft.workflows.stages import StageConfig

__all__ = [
    "DiskFull",
    "LocalRunStore",
    "MissingArtifact",
    "RunStore",
    "StorageError",
    "fetch_uri",
    "open_run_store",
]


def open_run_store(config: StageConfig) -> RunStore:
    """The store of the run that `config` belongs to (local folder or S3)."""
    keep = config.job.spec.psft.keep_checkpoints
    if config.run_root.startswith("s3://"):
        from psft.trainer.storage.s3 import S3RunStore

        return S3RunStore.from_config(config)
    try:
        root = local_path(config.run_root)
    except PathProblem as exc:
        raise StorageError(
            f"run root: {exc} (only local folders and s3:// URIs are supported)"
        ) from None
    return LocalRunStore(root, keep_checkpoints=keep)
