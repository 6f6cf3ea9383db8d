"""The stage DAG of a PSFTJob: a pure function of the spec.

Both executors render this same list: the Argo renderer into Workflow tasks, the local
executor into processes run in order. Each stage runs `psft <kind> --config stage.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from psft.workflows.spec import PSFTJob

StageKind = Literal["prepare", "train", "eval", "grpo", "report"]


@dataclass(frozen=True)
class Stage:
    name: str
    """Unique within the job; also the Argo task name."""
    kind: StageKind
    depends: tuple[str, ...] = ()
    target: str | None = None
    """For eval: whose checkpoints to evaluate (train or grpo)."""
    gpus: int = 0
    args: dict[str, str] = field(default_factory=dict)
    objective: str | None = None
    """train stages of a spec.compare arm: the objective this arm trains with."""


COMPARE_ARM = "sft"
"""The objective of the spec.compare arm; its stages are `train-sft` and `eval-sft`."""


def arm_of(stage: Stage, job: PSFTJob) -> str:
    """The arm a training or eval stage belongs to, named by its objective (psft, sft) or
    `grpo` for the GRPO follow-up."""
    if stage.kind == "grpo" or stage.target == "grpo":
        return "grpo"
    return stage.objective or job.spec.psft.objective


def build_pipeline(job: PSFTJob) -> list[Stage]:
    """Stages in a valid execution order (each after its dependencies)."""
    spec = job.spec
    gpus = spec.resources.gpus_per_node
    stages = [
        Stage("prepare", "prepare"),
        Stage("train", "train", depends=("prepare",), gpus=gpus),
    ]
    last = "train"
    if spec.eval.enabled:
        stages.append(Stage("eval", "eval", depends=("train",), target="train", gpus=gpus))
        last = "eval"
    if spec.grpo.enabled:
        stages.append(Stage("grpo", "grpo", depends=(last,), gpus=gpus))
        last = "grpo"
        if spec.eval.enabled and spec.grpo.evaluate:
            stages.append(Stage("eval-grpo", "eval", depends=("grpo",), target="grpo", gpus=gpus))
            last = "eval-grpo"
    ends = [last]
    if spec.compare.enabled:
        train_arm = f"train-{COMPARE_ARM}"
        stages.append(
            Stage(train_arm, "train", depends=("prepare",), gpus=gpus, objective=COMPARE_ARM)
        )
        ends.append(train_arm)
        if spec.eval.enabled:
            eval_arm = f"eval-{COMPARE_ARM}"
            stages.append(
                Stage(eval_arm, "eval", depends=(train_arm,), target=train_arm, gpus=gpus,
                      objective=COMPARE_ARM)
            )  # fmt: skip
            ends[-1] = eval_arm
    stages.append(Stage("report", "report", depends=tuple(ends)))
    return stages
