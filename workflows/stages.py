"""The configuration a stage process receives: `psft <kind> --config stage.json`.

The same JSON is written by the local executor into the run folder and passed by the
Argo Workflow as an input artifact/parameter, so a stage runs identically in both.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from psft.workflows.pipeline import Stage, StageKind
from psft.workflows.spec import PSFTJob


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    stage: str
    """Stage name (unique in the job, e.g. `eval-grpo`)."""
    kind: StageKind
    job: PSFTJob
    run_root: str = Field(alias="runRoot")
    """Root of the run's artifacts: a local folder or an s3:// URI (see workflows.layout)."""
    target: str | None = None
    """eval only: evaluate the checkpoints of this stage (train or grpo)."""
    work_dir: str | None = Field(None, alias="workDir")
    """Local scratch folder; defaults to a cache folder under the run when local."""
    metrics_port: int | None = Field(None, alias="metricsPort")
    """Overrides job.spec.monitoring.metricsPort (0: any free port)."""
    progress: bool = True
    """Show a live progress bar (off in pods and CI logs)."""

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)


def stage_config(job: PSFTJob, stage: Stage, run_root: str, **extra: object) -> StageConfig:
    return StageConfig(
        stage=stage.name,
        kind=stage.kind,
        job=job,
        run_root=run_root,
        target=stage.target,
        **extra,  # type: ignore[arg-type]
    )


def read_stage_config(path: str | Path) -> StageConfig:
    return StageConfig.model_validate(json.loads(Path(path).read_text()))
