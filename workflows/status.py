"""The status of a PSFTJob, as the operator writes it through the status subresource.

The CRD's status schema is generated from these models (psft.workflows.crd), so the
operator and the printer columns agree on the field names. camelCase on the wire.
Every field is optional: the operator fills them as the Workflow advances.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Invalid"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]
ConditionType = Literal[
    "Valid", "WorkflowCreated", "Training", "Evaluating", "Reinforcing", "Succeeded", "Failed"
]
CONDITION_TYPES: tuple[str, ...] = ConditionType.__args__  # type: ignore[attr-defined]
StagePhase = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped", "Error", "Omitted"]


class StatusSection(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Condition(StatusSection):
    """One observation of the job's state, in the usual Kubernetes form."""

    type: ConditionType
    """Valid, WorkflowCreated, Training, Evaluating, Reinforcing, Succeeded or Failed."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str | None = None
    """One CamelCase word for machines (e.g. InvalidSpec, WorkflowFailed)."""
    message: str | None = None
    """What happened, for people (for Valid=False: every field error)."""
    last_transition_time: str | None = None
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class StageStatus(StatusSection):
    """Progress of one stage (one Argo node), mirrored from the Workflow."""

    phase: StagePhase
    """Argo node phase of the stage."""
    started_at: str | None = None
    """Start time (RFC 3339)."""
    finished_at: str | None = None
    """End time (RFC 3339)."""
    progress: str | None = None
    """`step/total` as the stage reports it through $ARGO_PROGRESS_FILE."""
    message: str | None = None
    """Argo's message for the node (why it failed, for instance)."""
    attempts: Annotated[int, Field(ge=1)] | None = None
    """Attempts Argo made at the stage so far, counted as the children of its Retry node
    (above 1: retried after an infrastructure failure, see spec.backoffLimit); shown once
    the stage has a Retry node. A pod that Argo re-creates in place after it was deleted
    (same attempt, new pod) is not counted."""


class TrainingMetrics(StatusSection):
    """Latest training record of the running train or grpo stage."""

    model_config = ConfigDict(extra="allow")

    stage: str | None = None
    """Stage the record comes from (train or grpo)."""
    step: int | None = None
    """Optimizer step of the record."""
    total_steps: int | None = None
    """Steps the stage will run."""
    epoch: float | None = None
    """Fractional epoch."""
    loss: float | None = None
    """Training loss of the step."""
    entropy: float | None = None
    """Token-mean policy entropy on response tokens (watch it for collapse)."""
    clip_fraction: float | None = None
    """Share of response tokens whose gradient the clip removed."""
    grad_norm: float | None = None
    """Global gradient norm before clipping."""
    learning_rate: float | None = None
    """Learning rate of the step."""
    tokens_per_second: float | None = None
    """Training throughput."""
    val_loss: float | None = None
    """Held-out loss of the latest evaluation step."""


class BenchmarkResult(StatusSection):
    """Accuracy on one benchmark, for the evaluated checkpoint."""

    model_config = ConfigDict(extra="allow")

    avg_at_k: float | None = None
    """Mean accuracy over the k samples per problem (Avg@k)."""
    pass_at_k: float | None = None
    """Share of problems with at least one correct sample (pass@k)."""
    maj_at_k: float | None = None
    """Accuracy of the majority answer (maj@k)."""
    k: int | None = None
    """Samples per problem."""
    problems: int | None = None
    """Problems evaluated."""
    checkpoint: str | None = None
    """Which checkpoint the numbers belong to (e.g. train/final)."""


class PSFTJobStatus(StatusSection):
    """Observed state of a PSFTJob; written by the operator only."""

    phase: Phase | None = None
    """Pending, Running, Succeeded, Failed, Suspended or Invalid."""
    message: str | None = None
    """Short human summary of the current phase."""
    observed_generation: int | None = None
    """metadata.generation of the spec this status describes."""
    workflow_name: str | None = None
    """Name of the Argo Workflow that runs the job (same namespace)."""
    stage: str | None = None
    """Stage running now (or the last one that ran)."""
    progress: str | None = None
    """`step/total` of the running stage, e.g. 120/216."""
    started_at: str | None = None
    """When the Workflow started (RFC 3339)."""
    finished_at: str | None = None
    """When the Workflow finished (RFC 3339)."""
    conditions: list[Condition] = Field(default_factory=list)
    """Valid, WorkflowCreated, Training, Evaluating, Reinforcing, Succeeded, Failed."""
    stages: dict[str, StageStatus] = Field(default_factory=dict)
    """Per stage, keyed by stage name (prepare, train, eval, grpo, eval-grpo, report)."""
    metrics: TrainingMetrics | None = None
    """Latest training metrics (of the main arm when spec.compare is on)."""
    arm_metrics: dict[str, TrainingMetrics] | None = None
    """spec.compare: the latest training metrics of each arm, keyed by arm (psft, sft)."""
    eval_results: dict[str, BenchmarkResult] = Field(default_factory=dict)
    """Evaluation results keyed by `<eval stage>/<benchmark>`, e.g. `eval/aime24`."""
    best_avg_at_k: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Highest Avg@k among evalResults of the job's own arm (with spec.compare, the SFT
    baseline's eval-sft results are not counted; the printer column `Best Avg@k`)."""
    artifacts: dict[str, str] = Field(default_factory=dict)
    """URIs of the run's outputs: runRoot, finalModel, report, ..."""
