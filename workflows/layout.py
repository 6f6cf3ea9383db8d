"""Where each artifact of a run lives, relative to the run root.

The run root is `<storage.local.path>/<job name>/` locally and
`s3://<bucket>/<prefix>/<namespace>/<job name>/<uid>/` with S3 storage. Every stage reads
and writes these relative keys, whichever storage holds them.
"""

from __future__ import annotations

from psft.workflows.spec import PSFTJob

SPEC = "spec.yaml"
SUMMARY = "summary.json"

DATA_TRAIN = "data/train.parquet"
DATA_VALIDATION = "data/validation.parquet"
DATA_STATS = "data/stats.json"


def metrics(stage: str) -> str:
    """Durable per-step metrics of a stage (train, grpo): one JSON record per line."""
    return f"{stage}/metrics.jsonl"


def checkpoints(stage: str) -> str:
    """Folder of resumable checkpoints `step-N/` and the `latest` marker."""
    return f"{stage}/checkpoints"


def checkpoint(stage: str, step: int) -> str:
    return f"{stage}/checkpoints/step-{step}"


def latest_marker(stage: str) -> str:
    """Object naming the newest complete checkpoint; readers trust only this marker."""
    return f"{stage}/checkpoints/latest"


def final_model(stage: str) -> str:
    """Hugging Face folder (safetensors) of the stage's final policy."""
    return f"{stage}/final"


def stage_summary(stage: str) -> str:
    return f"{stage}/summary.json"


def eval_dir(target: str) -> str:
    """Evaluation outputs for the checkpoints of `target` (train or grpo)."""
    return "eval" if target == "train" else f"eval-{target}"


REPORT = "report"


def run_root(job: PSFTJob) -> str:
    """Root URI (or folder) of a job's run, from its storage spec."""
    storage = job.spec.storage
    meta = job.metadata
    if storage.type == "s3" and storage.s3 is not None:
        prefix = storage.s3.prefix.strip("/")
        parts = [p for p in (prefix, meta.namespace, meta.name, meta.uid or "local") if p]
        return f"s3://{storage.s3.bucket}/" + "/".join(parts)
    return f"{storage.local.path.rstrip('/')}/{meta.name}"
