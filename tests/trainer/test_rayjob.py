"""The multi-node train step's supervisor (`psft rayjob`): its decisions, pure.

Its calls against a real API server, real KubeRay and the chart's RBAC are in
tests/cluster/test_platform.py."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from servers.jobs import make_job, make_stage_config

from psft.trainer import rayjob
from psft.trainer.telemetry import Telemetry
from psft.workflows import argo

JOB = "qwen"
UID = "wf-uid-1"


@pytest.mark.parametrize(
    ("deployment", "job_status", "expected"),
    [
        (None, None, "running"),  # just created
        ("Initializing", None, "running"),
        ("Suspended", None, "running"),  # Kueue has not admitted it yet
        ("Running", "RUNNING", "running"),
        ("Running", "SUCCEEDED", "running"),  # the submitter has not finished yet
        ("Retrying", "FAILED", "running"),  # KubeRay retries it (backoffLimit)
        ("Complete", "SUCCEEDED", "succeeded"),
        ("Complete", "STOPPED", "failed"),  # `ray job stop`: never retried
        ("Complete", "FAILED", "failed"),  # complete, but not a success
        ("Failed", "FAILED", "failed"),  # retries used up
        ("Failed", "RUNNING", "failed"),  # activeDeadlineSeconds passed
        ("Failed", None, "failed"),  # submission failed
        ("ValidationFailed", None, "failed"),  # KubeRay >= 1.5 refused the spec
    ],
)
def test_every_end_of_a_rayjob_ends_the_step(
    deployment: str | None, job_status: str | None, expected: str
) -> None:
    status = {"jobDeploymentStatus": deployment, "jobStatus": job_status}
    assert rayjob.outcome({k: v for k, v in status.items() if v is not None}) == expected


def _rayjob(
    job: str = JOB, owner: str | None = UID, deleting: bool = False, **status: str
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"psft-{job}-train", "labels": {argo.JOB_LABEL: job}}
    if owner:
        meta["ownerReferences"] = [rayjob.owner_reference("psft-x", owner)]
    if deleting:
        meta["deletionTimestamp"] = "2026-12-04T10:00:00Z"
    return {"metadata": meta, "status": status}


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, "create"),
        (_rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING"), "adopt"),
        (_rayjob(jobDeploymentStatus="Retrying", jobStatus="FAILED"), "adopt"),
        # ended: a retried step or `argo retry` runs the training again
        (_rayjob(jobDeploymentStatus="Failed", jobStatus="FAILED"), "replace"),
        (_rayjob(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"), "replace"),
        # still running for an earlier Workflow of the job (restarted on a spec change)
        (_rayjob(owner="old-uid", jobDeploymentStatus="Running"), "replace"),
        (_rayjob(owner=None, jobDeploymentStatus="Running"), "replace"),
        (_rayjob(deleting=True, jobDeploymentStatus="Failed"), "wait"),
        # not this job's: never deleted
        (_rayjob(job="someone-else", jobDeploymentStatus="Failed"), "refuse"),
    ],
)
def test_what_the_supervisor_does_with_the_rayjob_it_finds(
    existing: dict[str, Any] | None, expected: str
) -> None:
    assert rayjob.plan(existing, JOB, UID) == expected


def test_a_failure_names_kuberays_states_reason_and_message() -> None:
    ended = _rayjob(
        jobDeploymentStatus="Failed",
        jobStatus="FAILED",
        reason="DeadlineExceeded",
        message="The RayJob has passed the activeDeadlineSeconds.",
    )
    message = rayjob.failure_message(ended)
    assert message == (
        "RayJob psft-qwen-train ended without success (jobDeploymentStatus Failed, jobStatus "
        "FAILED, reason DeadlineExceeded): The RayJob has passed the activeDeadlineSeconds."
    )


def test_progress_is_read_from_the_drivers_own_metrics_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's exposition, served by the trainer's real Telemetry, gives step/total;
    the supervisor writes it to Argo's progress file."""
    monkeypatch.setenv("PSFT_METRICS_ADDR", "127.0.0.1")
    job = make_job(storage={"type": "local", "local": {"path": str(tmp_path / "runs")}})
    config = make_stage_config(job, metrics_port=0)
    record = {"step": 7, "total_steps": 40, "loss": -0.9, "entropy": 1.2, "clip_fraction": 0.0}
    with Telemetry(config, tmp_path / "metrics.jsonl", publish=False) as telemetry:
        assert rayjob.progress_from_metrics(_get(telemetry.url)) is None  # nothing logged yet
        telemetry.log(record)
        progress = rayjob.progress_from_metrics(_get(telemetry.url))
    assert progress == {"step": 7, "total_steps": 40}
    assert rayjob.progress_from_metrics("not prometheus text {") is None

    progress_file = tmp_path / "progress"
    monkeypatch.setenv("ARGO_PROGRESS_FILE", str(progress_file))
    rayjob.report_progress(progress)
    assert progress_file.read_text() == "7/40\n"


def _get(url: str | None) -> str:
    assert url
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_outside_a_workflow_the_supervisor_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(rayjob.WORKFLOW_NAME_ENV, raising=False)
    with pytest.raises(rayjob.UserError, match="PSFT_WORKFLOW_NAME and \\$PSFT_WORKFLOW_UID"):
        rayjob.workflow_identity()
