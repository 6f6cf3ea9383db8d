"""PSFTJob status from the job and its Argo Workflow: pure functions, no API calls.

`desired_status` is the whole reconciliation of status: given the job, the owned Workflow
(or None) and what validation/creation found, it returns the status the job should show.
The operator writes it only when it differs from the current one (`status_changed`), so a
stream of Workflow events that change nothing visible causes no writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from psft.workflows import layout
from psft.workflows.benchmarks import final_or_last
from psft.workflows.pipeline import Stage, arm_of
from psft.workflows.spec import PSFTJob
from psft.workflows.status import PSFTJobStatus

Obj = Mapping[str, Any]

# Argo node phases -> our stage phases; Argo workflow phases -> PSFTJob phases
_WORKFLOW_PHASES = {
    "": "Pending",
    "Pending": "Pending",
    "Running": "Running",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
    "Error": "Failed",
}
_NODE_PHASES = {"Pending", "Running", "Succeeded", "Failed", "Skipped", "Error", "Omitted"}
_STAGE_CONDITIONS = {"train": "Training", "eval": "Evaluating", "grpo": "Reinforcing"}
_TRAINING_KINDS = ("train", "grpo")
# output parameters a stage sets (small JSON values): final training record, eval results
METRICS_PARAMETER = "metrics"
EVAL_PARAMETER = "eval-results"
_STAGE_REASONS = {
    "Succeeded": "StageSucceeded",
    "Pending": "StagePending",
    "Skipped": "StageSkipped",
    "Omitted": "StageSkipped",
}
_RETRY_CHILD = re.compile(r"^(?P<name>.+)\(\d+\)$")


@dataclass(frozen=True)
class Observation:
    """What the reconciler found before computing status."""

    errors: tuple[str, ...] = ()
    """Validation errors of the spec (field path: message); empty when valid."""
    workflow_name: str | None = None
    create_error: str | None = None
    create_reason: str = "CreateFailed"
    """Why the Workflow could not be created (shown on WorkflowCreated=False)."""
    refused_change: str | None = None
    """Set when the spec changed after start and restartPolicy is Never."""


def _condition(
    previous: Mapping[str, Obj],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> dict[str, Any]:
    before = previous.get(ctype)
    changed = before is None or before.get("status") != status
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed else before.get("lastTransitionTime", now),
        "observedGeneration": generation,
    }


def stage_nodes(workflow: Obj | None, stages: Iterable[Stage]) -> dict[str, Obj]:
    """The Argo node of each stage: the task node (a Retry node's retries are its children)."""
    names = {s.name for s in stages}
    found: dict[str, Obj] = {}
    nodes = ((workflow or {}).get("status") or {}).get("nodes") or {}
    for node in nodes.values():
        display = node.get("displayName") or ""
        if display in names and (display not in found or node.get("type") == "Retry"):
            found[display] = node
        elif (m := _RETRY_CHILD.match(display)) and m["name"] in names and m["name"] not in found:
            found[m["name"]] = node
    return found


def _last_attempt_message(workflow: Obj | None, node: Obj) -> str:
    """What went wrong in a stage: a Retry node's own message is Argo's verdict on retrying
    ("retryStrategy.expression evaluated to false"), its last attempt's is the failure."""
    nodes = ((workflow or {}).get("status") or {}).get("nodes") or {}
    children = [nodes[c] for c in node.get("children") or [] if c in nodes]
    if node.get("type") == "Retry" and children and children[-1].get("message"):
        return children[-1]["message"]
    return node.get("message") or ""


def _attempts(workflow: Obj | None, node: Obj) -> int | None:
    """Pods run for a stage: a Retry node's attempts are its children (None otherwise)."""
    if node.get("type") != "Retry":
        return None
    nodes = ((workflow or {}).get("status") or {}).get("nodes") or {}
    return max(len([c for c in node.get("children") or [] if c in nodes]), 1)


def _parameter(node: Obj, name: str) -> Any:
    for param in (node.get("outputs") or {}).get("parameters") or []:
        if param.get("name") == name and param.get("value"):
            try:
                return json.loads(param["value"])
            except (TypeError, ValueError):
                return None
    return None


def _progress(text: Any) -> tuple[int, int] | None:
    if isinstance(text, str) and (m := re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)):
        return int(m[1]), int(m[2])
    return None


_METRIC_KEYS = {
    "step": "step",
    "total_steps": "totalSteps",
    "epoch": "epoch",
    "loss": "loss",
    "entropy": "entropy",
    "clip_fraction": "clipFraction",
    "grad_norm": "gradNorm",
    "learning_rate": "learningRate",
    "tokens_per_second": "tokensPerSecond",
    "val_loss": "valLoss",
}


def _metrics_record(record: Obj) -> dict[str, Any]:
    """A stage summary (`<stage>/summary.json`: the last step's record under `final`, the
    step count as `steps`) or a bare metrics.jsonl record -> status.metrics (camelCase)."""
    if isinstance(record.get("final"), Mapping):
        record = {"step": record.get("steps"), **record, **record["final"]}
    elif "step" not in record and isinstance(record.get("steps"), int):
        record = {**record, "step": record["steps"]}
    out: dict[str, Any] = {}
    for snake, camel in _METRIC_KEYS.items():
        value = record.get(snake, record.get(camel))
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[camel] = value
    return out


_RESULT_KEYS = {
    "avg_at_k": "avgAtK",
    "pass_at_k": "passAtK",
    "maj_at_k": "majAtK",
    "k": "k",
    "problems": "problems",
    "checkpoint": "checkpoint",
}


def _eval_results(stage: str, value: Any) -> dict[str, dict[str, Any]]:
    """The eval stage's summary (`{"results": [{checkpoint, benchmark, avg_at_k, ...}]}`), a
    bare list of such rows, or `{benchmark: {...}}` -> `{stage/benchmark: result}`. With
    several checkpoints per benchmark the `final` one is shown (else the last)."""
    if isinstance(value, Mapping) and isinstance(value.get("results"), list):
        value = value["results"]
    if isinstance(value, list):
        value = final_or_last(r for r in value if isinstance(r, Mapping))
    if not isinstance(value, dict):
        return {}
    out = {}
    for bench, record in value.items():
        if not isinstance(record, dict):
            continue
        result = {}
        for snake, camel in _RESULT_KEYS.items():
            v = record.get(snake, record.get(camel))
            if v is not None:
                result[camel] = v
        out[f"{stage}/{bench}"] = result
    return out


def artifacts(job: PSFTJob, stages: Iterable[Stage]) -> dict[str, str]:
    """Where the run's outputs are (URIs under the run root)."""
    root = layout.run_root(job)
    kinds = {s.kind for s in stages}
    out = {
        "runRoot": root,
        "finalModel": f"{root}/{layout.final_model('train')}",
        "trainMetrics": f"{root}/{layout.metrics('train')}",
        "report": f"{root}/{layout.REPORT}",
        "summary": f"{root}/{layout.SUMMARY}",
    }
    if "grpo" in kinds:
        out["grpoModel"] = f"{root}/{layout.final_model('grpo')}"
    return out


def desired_status(
    body: Obj,
    job: PSFTJob | None,
    stages: list[Stage],
    workflow: Obj | None,
    seen: Observation,
    now: str,
) -> dict[str, Any]:
    """The full status the PSFTJob `body` should have (wire form, camelCase)."""
    previous = dict(body.get("status") or {})
    prev_conditions = {c.get("type"): c for c in previous.get("conditions") or [] if c.get("type")}
    generation = (body.get("metadata") or {}).get("generation")

    def cond(ctype: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return _condition(prev_conditions, ctype, status, reason, message, now, generation)

    status: dict[str, Any] = {"observedGeneration": generation}
    if seen.errors or job is None:
        message = "; ".join(seen.errors) or "the spec is not a valid PSFTJob"
        status.update(
            phase="Invalid",
            message=f"invalid spec: {message}",
            conditions=[cond("Valid", "False", "InvalidSpec", message)],
        )
        return _checked(status)

    conditions = []
    if seen.refused_change:
        conditions.append(cond("Valid", "False", "SpecChangeRefused", seen.refused_change))
    else:
        conditions.append(cond("Valid", "True", "SpecValid", "the spec passed validation"))
    status["artifacts"] = artifacts(job, stages)
    if seen.workflow_name:
        status["workflowName"] = seen.workflow_name

    if workflow is None and previous.get("phase") in ("Succeeded", "Failed"):
        # finished, and its Workflow was removed (ttlSecondsAfterFinished): keep the record
        kept = {**previous, "observedGeneration": generation}
        kept["conditions"] = [c for c in conditions if c["type"] == "Valid"] + [
            c for c in previous.get("conditions") or [] if c.get("type") != "Valid"
        ]
        return _checked(kept)

    if workflow is None:
        if seen.create_error:
            conditions.append(
                cond("WorkflowCreated", "False", seen.create_reason, seen.create_error)
            )
            status["message"] = f"cannot create the Workflow: {seen.create_error}"
        else:
            status["message"] = "creating the Workflow"
        status.update(phase="Pending", conditions=conditions)
        return _checked(status)

    wf_name = workflow["metadata"]["name"]
    status["workflowName"] = wf_name
    conditions.append(cond("WorkflowCreated", "True", "Created", f"Workflow {wf_name}"))
    wf_status = workflow.get("status") or {}
    wf_phase = wf_status.get("phase") or ""
    phase = _WORKFLOW_PHASES.get(wf_phase, "Pending")
    suspended = bool((workflow.get("spec") or {}).get("suspend"))
    if phase in ("Pending", "Running") and suspended:
        phase = "Suspended"
    for key, src in (("startedAt", "startedAt"), ("finishedAt", "finishedAt")):
        if wf_status.get(src):
            status[key] = wf_status[src]

    nodes = stage_nodes(workflow, stages)
    stage_status: dict[str, dict[str, Any]] = {}
    current: str | None = None
    # metrics of an earlier run (a restart recreates the Workflow) are not carried over
    same_run = previous.get("startedAt") in (None, wf_status.get("startedAt"))
    metrics: dict[str, Any] | None = previous.get("metrics") if same_run else None
    eval_results: dict[str, Any] = {}
    previous_arms = previous.get("armMetrics") if same_run else None
    arm_metrics: dict[str, Any] = dict(previous_arms or {})
    main_scores: list[float] = []
    for stage in stages:
        node = nodes.get(stage.name)
        if node is None:
            continue
        node_phase = node.get("phase") if node.get("phase") in _NODE_PHASES else "Pending"
        entry = {"phase": node_phase}
        for key in ("startedAt", "finishedAt", "progress"):
            if node.get(key):
                entry[key] = node[key]
        if message := _last_attempt_message(workflow, node):
            entry["message"] = message
        if attempts := _attempts(workflow, node):
            entry["attempts"] = attempts
        stage_status[stage.name] = entry
        if node_phase == "Running" and current is None:
            current = stage.name
        if stage.kind in _TRAINING_KINDS:
            arm = arm_of(stage, job) if job.spec.compare.enabled else None
            before = arm_metrics.get(arm) if arm else metrics
            record = _parameter(node, METRICS_PARAMETER)
            found = None
            if isinstance(record, dict):
                found = {"stage": stage.name, **_metrics_record(record)}
            elif (prog := _progress(node.get("progress"))) and node_phase == "Running":
                base = before if before and before.get("stage") == stage.name else {}
                found = {**base, "stage": stage.name, "step": prog[0], "totalSteps": prog[1]}
            if found and arm:
                arm_metrics[arm] = found
            if found and stage.objective is None:  # the main arm (and grpo)
                metrics = found
        if stage.kind == "eval":
            results = _eval_results(stage.name, _parameter(node, EVAL_PARAMETER))
            eval_results.update(results)
            if stage.objective is None:  # the job's own arm; the SFT baseline is not its best
                main_scores += [
                    r["avgAtK"]
                    for r in results.values()
                    if isinstance(r.get("avgAtK"), float | int)
                ]

    ran = [
        s.name
        for s in stages
        if stage_status.get(s.name, {}).get("phase") not in (None, "Omitted", "Skipped")
    ]
    failed_first = next((n for n in ran if stage_status[n]["phase"] in ("Failed", "Error")), None)
    last = current or failed_first or (ran[-1] if ran else None)
    if last:
        status["stage"] = last
        if stage_status[last].get("progress"):
            status["progress"] = stage_status[last]["progress"]
    if stage_status:
        status["stages"] = stage_status
    if metrics:
        status["metrics"] = metrics
    if arm_metrics:
        status["armMetrics"] = arm_metrics
    if eval_results:
        status["evalResults"] = eval_results
        if main_scores:
            status["bestAvgAtK"] = max(main_scores)

    running = {s.kind for s in stages if stage_status.get(s.name, {}).get("phase") == "Running"}
    for kind, ctype in _STAGE_CONDITIONS.items():
        entries = [stage_status[s.name] for s in stages if s.kind == kind if s.name in stage_status]
        if not entries:
            continue
        if kind in running:
            conditions.append(cond(ctype, "True", "StageRunning", f"{kind} stage running"))
        else:
            # a failed arm (train-sft beside train) is what the condition reports
            phases = [e["phase"] for e in entries]
            final = next((p for p in phases if p in ("Failed", "Error")), phases[-1])
            reason = _STAGE_REASONS.get(final, "StageFailed")
            conditions.append(cond(ctype, "False", reason, f"{kind} stage {final.lower()}"))

    wf_message = wf_status.get("message") or ""
    if phase == "Succeeded":
        conditions.append(cond("Succeeded", "True", "WorkflowSucceeded", "all stages succeeded"))
        status["message"] = "all stages succeeded"
    elif phase == "Failed":
        failed = [n for n, s in stage_status.items() if s["phase"] in ("Failed", "Error")]
        detail = (stage_status[failed[0]].get("message", "") if failed else "") or wf_message
        where = f"stage {failed[0]} failed" if failed else f"Workflow {wf_phase.lower()}"
        message = f"{where}: {detail}" if detail else where
        conditions.append(cond("Failed", "True", "WorkflowFailed", message))
        status["message"] = message
    elif phase == "Suspended":
        status["message"] = "suspended (spec.suspend is true)"
    elif phase == "Running":
        status["message"] = f"running stage {current}" if current else "running"
    else:
        status["message"] = "waiting for the Workflow to start"
    if seen.refused_change:
        status["message"] = seen.refused_change
    status.update(phase=phase, conditions=conditions)
    return _checked(status)


def _checked(status: dict[str, Any]) -> dict[str, Any]:
    """Fail loudly (in tests) if the status does not fit the CRD's status schema."""
    return PSFTJobStatus.model_validate(status).to_wire()


def status_changed(current: Obj | None, desired: Obj) -> bool:
    """Whether writing `desired` would change anything (the status subresource replaces it)."""
    return dict(current or {}) != dict(desired)


def status_patch(current: Obj | None, desired: Obj) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) turning `current` into `desired`; null removes keys."""
    current = current or {}
    patch: dict[str, Any] = {k: None for k in current if k not in desired}
    for key, value in desired.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            if sub := status_patch(old, value):
                patch[key] = sub
        elif old != value:
            patch[key] = value
    return patch
