"""The configuration a stage process receives: `psft <kind> --config stage.json`.

The same JSON is written by the local executor into the run folder and passed by the
Argo Workflow as an input artifact/parameter, so a stage runs identically in both.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from psft.workflows.pipeline import Stage, StageKind
from psft.workflows.spec import PSFTJob, PSFTSpec
from psft.workflows.spec_file import SpecFileError, parse_json, read_text
from psft.workflows.validate import InvalidJob, schema_errors, validate_job


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
    objective: Literal["psft", "sft"] | None = None
    """train stages of a spec.compare arm: train with this objective instead of
    job.spec.psft.objective (everything else of the job stays the same)."""

    def psft_spec(self) -> PSFTSpec:
        """job.spec.psft as this stage trains with it (the arm's objective applied)."""
        spec = self.job.spec.psft
        if self.objective is None or self.objective == spec.objective:
            return spec
        return spec.model_copy(update={"objective": self.objective})

    def trained_job(self) -> PSFTJob:
        """The job as this stage trains it: job.spec.psft replaced by psft_spec()."""
        psft = self.psft_spec()
        if psft is self.job.spec.psft:
            return self.job
        spec = self.job.spec.model_copy(update={"psft": psft})
        return self.job.model_copy(update={"spec": spec})

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)


def stage_config(job: PSFTJob, stage: Stage, run_root: str, **extra: object) -> StageConfig:
    return StageConfig(
        stage=stage.name,
        kind=stage.kind,
        job=job,
        run_root=run_root,
        target=stage.target,
        objective=stage.objective,
        **extra,  # type: ignore[arg-type]
    )


ENCODED_SUFFIX = ".b64"
"""A stage config whose file name ends so is base64 of the JSON. The Argo Workflow carries
it that way: Argo substitutes `{{...}}` anywhere in a template (raw artifact data, resource
manifests), so a spec string such as a system prompt with `{{workflow.name}}` in it would be
rewritten or rejected; base64 text contains no braces."""


def encode_stage_config(config_json: str) -> str:
    return base64.b64encode(config_json.encode()).decode()


MAX_STAGE_CONFIG_BYTES = 8 << 20
"""A stage config carries the resolved job (a spec file holds at most 1 MiB), base64 in a pod."""


def read_stage_config(path: str | Path) -> StageConfig:
    """The stage config in `path`; SpecFileError (one line, the file and the fix) otherwise.

    Its job is checked as `psft validate` checks a spec (the schema, then every cross-field
    rule of workflows.validate)."""
    text = read_text(path, MAX_STAGE_CONFIG_BYTES, "a stage config")
    if str(path).endswith(ENCODED_SUFFIX):
        try:
            text = base64.b64decode(text.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise SpecFileError(path, f"not base64 of a UTF-8 stage config: {exc}") from None
    try:
        data = parse_json(text)
        if isinstance(data, dict) and isinstance(data.get("job"), dict):
            _check_job(path, data["job"])
        return StageConfig.model_validate(data)
    except ValueError as exc:  # parse_json's, or pydantic's ValidationError
        raise SpecFileError(path, _stage_config_problem(exc)) from None


def _check_job(path: str | Path, job: Any) -> None:
    """The job of a stage config passes every rule `psft validate` and the operator apply
    to a spec (workflows.validate.validate_job: the schema and the cross-field rules)."""
    try:
        validate_job(job)
    except InvalidJob as exc:
        shown = [f"job.{e.path}: {e.message}" if e.path else e.message for e in exc.errors]
        raise SpecFileError(
            path,
            f"its job is not a valid PSFTJob ({'; '.join(shown)}); fix the PSFTJob (`psft "
            "validate` lists the same errors) and let `psft run` or the operator write the "
            "stage config again",
        ) from None


def _stage_config_problem(exc: ValueError) -> str:
    if not isinstance(exc, ValidationError):
        return f"not valid JSON: {exc}"
    errors = "; ".join(str(e) for e in schema_errors(exc))
    return f"not a stage config written by psft ({errors}); `psft run` and the operator write them"
