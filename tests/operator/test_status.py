"""Pure status computation: Workflow (+ job) -> PSFTJob status."""

from __future__ import annotations

import json

import pytest
from operator_harness import job_manifest, node, nodes

from psft.operator.reconcile import spec_hash, validate
from psft.operator.status import Observation, desired_status, stage_nodes, status_patch
from psft.workflows.pipeline import build_pipeline

WF = "psft-j"


def _body(**spec) -> dict:
    body = job_manifest("j", **spec)
    body["metadata"].update(namespace="ml", uid="u-1", generation=3)
    return body


def _workflow(status: dict | None = None, suspend: bool = False) -> dict:
    wf = {"metadata": {"name": WF}, "spec": {"entrypoint": "psft"}}
    if suspend:
        wf["spec"]["suspend"] = True
    if status is not None:
        wf["status"] = status
    return wf


def _status(body: dict, workflow: dict | None, now: str = "2026-01-01T00:00:00Z", **seen):
    job, errors = validate(body)
    stages = build_pipeline(job) if job else []
    observation = Observation(errors=tuple(errors), workflow_name=WF, **seen)
    return desired_status(body, job, stages, workflow, observation, now)


def _outputs(name: str, value: object) -> dict:
    return {"parameters": [{"name": name, "value": json.dumps(value)}]}


def _conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_invalid_spec_lists_every_error():
    body = _body(psft={"batchSize": 8, "miniBatchSize": 3, "microBatchSize": 5, "bogus": 1})
    status = _status(body, None)
    assert status["phase"] == "Invalid" and status["observedGeneration"] == 3
    (valid,) = status["conditions"]
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.psft.bogus: unknown field" in valid["message"]
    assert "workflowName" not in status


def test_pending_before_and_after_creation():
    body = _body()
    status = _status(body, None)
    assert status["phase"] == "Pending" and status["message"] == "creating the Workflow"
    assert status["artifacts"]["runRoot"] == "s3://runs/psft/ml/j/u-1"
    failed = _status(body, None, create_error="HTTP 403: forbidden")
    assert _conditions(failed)["WorkflowCreated"] == ("False", "CreateFailed")
    created = _status(body, _workflow())
    assert _conditions(created) == {
        "Valid": ("True", "SpecValid"),
        "WorkflowCreated": ("True", "Created"),
    }


def test_running_progress_and_retry_nodes():
    body = _body()
    wf = _workflow(
        {
            "phase": "Running",
            "nodes": nodes(
                node(WF, "prepare", "Succeeded"),
                # a retried stage: the Retry node is the stage, its children are attempts
                {**node(WF, "train", "Running", progress="7/10"), "type": "Retry"},
                {
                    **node(WF, "train(0)", "Failed", message="pod deleted"),
                    "displayName": "train(0)",
                },
            ),
        }
    )
    status = _status(body, wf)
    assert status["phase"] == "Running" and status["stage"] == "train"
    assert status["progress"] == "7/10"
    assert status["stages"]["train"]["phase"] == "Running"
    assert status["metrics"] == {"stage": "train", "step": 7, "totalSteps": 10}
    assert _conditions(status)["Training"] == ("True", "StageRunning")
    assert set(stage_nodes(wf, build_pipeline(validate(body)[0]))) == {"prepare", "train"}


def test_transition_times_only_move_on_change():
    body = _body()
    running = _workflow({"phase": "Running", "nodes": nodes(node(WF, "train", "Running", "1/9"))})
    first = _status(body, running, now="2026-01-01T00:00:00Z")
    body["status"] = first
    later = _status(body, running, now="2026-01-01T05:00:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}
    assert set(times.values()) == {"2026-01-01T00:00:00Z"}
    assert later == first
    done = _workflow({"phase": "Running", "nodes": nodes(node(WF, "train", "Succeeded"))})
    moved = _status(body, done, now="2026-01-01T06:00:00Z")
    training = next(c for c in moved["conditions"] if c["type"] == "Training")
    assert training["status"] == "False" and training["lastTransitionTime"].startswith(
        "2026-01-01T06"
    )


def test_metrics_survive_progress_updates_and_final_outputs_win():
    body = _body()
    body["status"] = {"metrics": {"stage": "train", "step": 4, "entropy": 0.7}}
    wf = _workflow({"phase": "Running", "nodes": nodes(node(WF, "train", "Running", "5/9"))})
    assert _status(body, wf)["metrics"] == {
        "stage": "train",
        "step": 5,
        "totalSteps": 9,
        "entropy": 0.7,
    }
    record = {"step": 9, "total_steps": 9, "entropy": 0.5, "clip_fraction": 0.01, "extra": "x"}
    outputs = {"parameters": [{"name": "metrics", "value": json.dumps(record)}]}
    wf = _workflow(
        {"phase": "Running", "nodes": nodes(node(WF, "train", "Succeeded", outputs=outputs))}
    )
    metrics = _status(body, wf)["metrics"]
    assert metrics == {
        "stage": "train",
        "step": 9,
        "totalSteps": 9,
        "entropy": 0.5,
        "clipFraction": 0.01,
    }


def test_grpo_eval_results_and_best_score():
    body = _body(grpo={"enabled": True, "prompts": ["s3://data/p.jsonl"]})
    ev1 = {
        "parameters": [{"name": "eval-results", "value": json.dumps({"aime24": {"avg_at_k": 0.1}})}]
    }
    ev2 = [{"benchmark": "aime24", "avgAtK": 0.3, "passAtK": 0.6, "k": 4}]
    ev2_out = {"parameters": [{"name": "eval-results", "value": json.dumps(ev2)}]}
    wf = _workflow(
        {
            "phase": "Running",
            "nodes": nodes(
                node(WF, "eval", "Succeeded", outputs=ev1),
                node(WF, "grpo", "Running", "2/50"),
                node(WF, "eval-grpo", "Pending", outputs=ev2_out),
            ),
        }
    )
    status = _status(body, wf)
    assert status["evalResults"] == {
        "eval/aime24": {"avgAtK": 0.1},
        "eval-grpo/aime24": {"avgAtK": 0.3, "passAtK": 0.6, "k": 4},
    }
    assert status["bestAvgAtK"] == 0.3
    conditions = _conditions(status)
    assert conditions["Reinforcing"] == ("True", "StageRunning")
    assert conditions["Evaluating"] == ("False", "StagePending")
    assert status["metrics"]["stage"] == "grpo"


@pytest.mark.parametrize("phase", ["Failed", "Error"])
def test_failure_names_the_stage(phase):
    wf = _workflow(
        {
            "phase": phase,
            "nodes": nodes(node(WF, "train", "Failed", message="exit code 1")),
        }
    )
    status = _status(_body(), wf)
    assert status["phase"] == "Failed"
    assert _conditions(status)["Failed"] == ("True", "WorkflowFailed")
    assert status["message"] == "stage train failed: exit code 1"


def test_a_failed_retry_node_reports_its_last_attempts_message_and_stage():
    # what Argo 3.7 records (seen on the real controller): the Retry node's own message is
    # its verdict on retrying; the attempt (a Pod node, its child) holds the failure
    retry = node(
        WF,
        "prepare",
        "Failed",
        type="Retry",
        children=[f"{WF}-prepare-0"],
        message="retryStrategy.expression evaluated to false",
    )
    attempt = node(WF, "prepare(0)", "Failed", message="Error (exit code 2)")
    attempt["id"] = f"{WF}-prepare-0"
    omitted = [
        node(WF, s, "Omitted", message="omitted: depends condition not met")
        for s in ("train", "eval", "report")
    ]
    wf = _workflow(
        {"phase": "Failed", "message": "child failed", "nodes": nodes(retry, attempt, *omitted)}
    )
    status = _status(_body(), wf)
    assert status["message"] == "stage prepare failed: Error (exit code 2)"
    assert status["stages"]["prepare"]["message"] == "Error (exit code 2)"
    assert status["stage"] == "prepare"  # not the last omitted stage


def test_suspended_and_refused_change():
    wf = _workflow({"phase": "Running"}, suspend=True)
    assert _status(_body(), wf)["phase"] == "Suspended"
    finished = _workflow({"phase": "Succeeded"}, suspend=True)
    assert _status(_body(), finished)["phase"] == "Succeeded"
    refused = _status(_body(), _workflow({"phase": "Running"}), refused_change="no")
    assert _conditions(refused)["Valid"] == ("False", "SpecChangeRefused")
    assert refused["phase"] == "Running" and refused["message"] == "no"


def test_spec_hash_ignores_suspend_and_defaults():
    base, _ = validate(_body())
    suspended, _ = validate(_body(suspend=True))
    explicit, _ = validate(_body(restartPolicy="Never"))
    changed, _ = validate(_body(restartPolicy="OnSpecChange"))
    assert spec_hash(base) == spec_hash(suspended) == spec_hash(explicit)
    assert spec_hash(base) != spec_hash(changed)


def test_status_patch_is_a_minimal_merge_patch():
    current = {"phase": "Running", "stages": {"train": {"phase": "Running", "message": "x"}}}
    desired = {"phase": "Running", "stages": {"train": {"phase": "Succeeded"}}, "stage": "eval"}
    assert status_patch(current, desired) == {
        "stages": {"train": {"phase": "Succeeded", "message": None}},
        "stage": "eval",
    }
    assert status_patch(desired, desired) == {}


def test_finished_record_is_kept_when_the_workflow_is_gone():
    body = _body()
    done = _workflow({"phase": "Succeeded", "nodes": nodes(node(WF, "report", "Succeeded"))})
    body["status"] = _status(body, done)
    body["metadata"]["generation"] = 4
    kept = _status(body, None, now="2026-02-01T00:00:00Z")
    assert kept["phase"] == "Succeeded" and kept["stages"] == body["status"]["stages"]
    assert kept["observedGeneration"] == 4
    assert _conditions(kept)["Succeeded"] == ("True", "WorkflowSucceeded")


def test_a_new_run_does_not_inherit_old_metrics():
    body = _body()
    body["status"] = {"startedAt": "2026-01-01T00:00:00Z", "metrics": {"stage": "train", "step": 9}}
    rerun = _workflow({"phase": "Running", "startedAt": "2026-03-01T00:00:00Z"})
    assert "metrics" not in _status(body, rerun)
    fresh = _workflow({})
    assert "metrics" not in _status(body, fresh)
    same = _workflow({"phase": "Running", "startedAt": "2026-01-01T00:00:00Z"})
    assert _status(body, same)["metrics"] == {"stage": "train", "step": 9}


def test_statuses_fit_the_crd_status_schema():
    """What the API server would check (and prune) on a status write."""
    import jsonschema

    from psft.workflows.crd import build_crd, to_json_schema

    version = build_crd()["spec"]["versions"][0]
    schema = to_json_schema(version["schema"]["openAPIV3Schema"]["properties"]["status"])
    body = _body(grpo={"enabled": True, "prompts": ["s3://data/p.jsonl"]})
    record = {"step": 3, "total_steps": 9, "entropy": 0.4, "learning_rate": 1e-6}
    evals = {"aime24": {"avg_at_k": 0.2, "pass_at_k": 0.5, "k": 4, "problems": 30}}
    wf = _workflow(
        {
            "phase": "Failed",
            "startedAt": "2026-01-01T00:00:00Z",
            "finishedAt": "2026-01-01T01:00:00Z",
            "nodes": nodes(
                node(WF, "train", "Succeeded", "9/9", outputs=_outputs("metrics", record)),
                node(WF, "eval", "Succeeded", outputs=_outputs("eval-results", evals)),
                node(WF, "grpo", "Failed", "3/50", message="exit code 1"),
            ),
        }
    )
    statuses = [
        _status(body, None),
        _status(body, wf),
        _status(_body(psft={"batchSize": 3, "miniBatchSize": 2}), None),
        _status(body, _workflow({"phase": "Running"}), refused_change="changed"),
    ]
    for status in statuses:
        jsonschema.validate(status, schema)


def test_reads_the_stage_summary_files_the_trainer_writes():
    # trainer/engine/loop.py: train/summary.json; trainer/eval/stage.py: eval/summary.json
    train_summary = {
        "stage": "train",
        "steps": 12,
        "total_steps": 12,
        "final": {"step": 12, "loss": 0.3, "entropy": 0.55, "grad_norm": 1.5, "epoch": 1.0},
        "final_model": "train/final",
    }
    eval_summary = {
        "target": "train",
        "results": [
            {"checkpoint": "step-6", "benchmark": "aime24", "avg_at_k": 0.4, "k": 4},
            {"checkpoint": "final", "benchmark": "aime24", "avg_at_k": 0.25, "k": 4},
            {"checkpoint": "final", "benchmark": "amc23", "avg_at_k": 0.5, "problems": 40},
        ],
    }
    wf = _workflow(
        {
            "phase": "Running",
            "nodes": nodes(
                node(WF, "train", "Succeeded", outputs=_outputs("metrics", train_summary)),
                node(WF, "eval", "Succeeded", outputs=_outputs("eval-results", eval_summary)),
            ),
        }
    )
    status = _status(_body(), wf)
    assert status["metrics"] == {
        "stage": "train",
        "step": 12,
        "totalSteps": 12,
        "epoch": 1.0,
        "loss": 0.3,
        "entropy": 0.55,
        "gradNorm": 1.5,
    }
    assert status["evalResults"] == {
        "eval/aime24": {"avgAtK": 0.25, "k": 4, "checkpoint": "final"},
        "eval/amc23": {"avgAtK": 0.5, "problems": 40, "checkpoint": "final"},
    }
    assert status["bestAvgAtK"] == 0.5
    grpo = {"backend": "trl", "steps": 5, "prompts": 8}
    assert _metrics_of(grpo) == {"step": 5}


def _metrics_of(summary: dict) -> dict:
    from psft.operator.status import _metrics_record

    return _metrics_record(summary)


def test_compare_shows_both_arms_metrics_and_eval_results():
    """spec.compare: train and train-sft run in parallel; the status keeps each arm's
    latest metrics under armMetrics, `metrics` stays the PSFT arm's, and eval results of
    both arms are listed."""
    body = _body(compare={"enabled": True})
    psft_summary = {"steps": 20, "final": {"entropy": 0.9, "clip_fraction": 0.03}}
    wf = _workflow(
        {
            "phase": "Running",
            "nodes": nodes(
                node(WF, "train", "Succeeded", outputs=_outputs("metrics", psft_summary)),
                node(WF, "train-sft", "Running", "7/20"),
                node(WF, "eval", "Succeeded", outputs=_outputs("eval-results", [
                    {"benchmark": "math", "checkpoint": "final", "avg_at_k": 0.25}])),
            ),
        }
    )  # fmt: skip
    status = _status(body, wf)
    assert status["armMetrics"]["psft"] == {
        "stage": "train", "step": 20, "entropy": 0.9, "clipFraction": 0.03,
    }  # fmt: skip
    assert status["armMetrics"]["sft"] == {"stage": "train-sft", "step": 7, "totalSteps": 20}
    assert status["metrics"]["stage"] == "train"  # the SFT arm does not take it over
    assert status["evalResults"] == {"eval/math": {"avgAtK": 0.25, "checkpoint": "final"}}
    assert status["stage"] == "train-sft"

    # later: the SFT arm ends; its summary replaces the progress, the PSFT arm is kept
    wf["status"]["nodes"] = nodes(
        node(WF, "train", "Succeeded", outputs=_outputs("metrics", psft_summary)),
        node(WF, "train-sft", "Succeeded", outputs=_outputs("metrics", {
            "steps": 20, "final": {"entropy": 0.2, "clip_fraction": 0.0}})),
    )  # fmt: skip
    body["status"] = status
    later = _status(body, wf)
    assert later["armMetrics"]["sft"]["entropy"] == 0.2
    assert later["armMetrics"]["psft"]["entropy"] == 0.9


def test_compare_best_avg_is_the_psft_arms_and_a_failed_arm_shows_in_training():
    body = _body(compare={"enabled": True})
    rows = lambda score: [{"benchmark": "math", "checkpoint": "final", "avg_at_k": score}]  # noqa: E731
    wf = _workflow(
        {
            "phase": "Running",
            "nodes": nodes(
                node(WF, "train", "Succeeded"),
                node(WF, "train-sft", "Failed", message="exit code 2"),
                node(WF, "eval", "Succeeded", outputs=_outputs("eval-results", rows(0.25))),
                node(WF, "eval-sft", "Succeeded", outputs=_outputs("eval-results", rows(0.5))),
            ),
        }
    )  # fmt: skip
    status = _status(body, wf)
    assert status["evalResults"]["eval-sft/math"]["avgAtK"] == 0.5
    assert status["bestAvgAtK"] == 0.25  # the SFT baseline's score is not the job's best
    training = [c for c in status["conditions"] if c["type"] == "Training"]
    assert training and training[0]["status"] == "False"
    assert "failed" in training[0]["message"], training


def test_without_compare_there_are_no_arm_metrics():
    wf = _workflow({"phase": "Running", "nodes": nodes(node(WF, "train", "Running", "1/9"))})
    status = _status(_body(), wf)
    assert "armMetrics" not in status and status["metrics"]["step"] == 1


def test_a_retried_stage_shows_its_attempts():
    first = {**node(WF, "train(0)", "Failed", message="pod deleted"), "displayName": "train(0)"}
    second = {**node(WF, "train(1)", "Running", "3/10"), "displayName": "train(1)"}
    retry = {**node(WF, "train", "Running", "3/10"), "type": "Retry",
             "children": [first["id"], second["id"]]}  # fmt: skip
    wf = _workflow({"phase": "Running", "nodes": nodes(node(WF, "prepare", "Succeeded"),
                                                        retry, first, second)})  # fmt: skip
    status = _status(_body(), wf)
    assert status["stages"]["train"]["attempts"] == 2
    assert "attempts" not in status["stages"]["prepare"]  # a plain pod: no Retry node
