"""The cluster examples: valid PSFTJobs, valid against the CRD, and runnable with what
the chart installs (ServiceAccount, RBAC of resource steps, metrics port names)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_helpers import CHART, REPO, Render, one

from psft.workflows.argo import render_workflow
from psft.workflows.crd import to_json_schema
from psft.workflows.spec import PSFTJob
from psft.workflows.validate import load_job

# The workflows tests' helper: an example listed in EXPECTED_ERRORS (workflow_examples.py)
# must fail `validate_job` with exactly those fields, and is then parsed without the
# cross-field rules, so it still renders here.
sys.path.insert(0, str(REPO / "tests" / "workflows"))
from test_argo import example_job

EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml"))
# the examples for a cluster keep their run in S3; local ones (quickstart, compare) do not
CLUSTER_EXAMPLES = [
    p
    for p in EXAMPLES
    if (yaml.safe_load(p.read_text())["spec"].get("storage") or {}).get("type") == "s3"
]


def _job(path: Path) -> PSFTJob:
    """The example's job: validated as `psft validate` does, or, for one listed in
    EXPECTED_ERRORS, refused with exactly those fields and then parsed without the rules."""
    return example_job(path, yaml.safe_load(path.read_text()))


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((CHART / "crds" / "psftjobs.psft.dev.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    # OpenAPI v3 as JSON Schema, unknown fields rejected (kubectl's strict validation)
    return to_json_schema(version["schema"]["openAPIV3Schema"])


def test_the_seed_setups_are_all_there() -> None:
    names = {p.name for p in CLUSTER_EXAMPLES}
    assert {
        "qwen2.5-7b-limo.yaml",
        "llama3.1-8b.yaml",
        "grpo-followup.yaml",
        "multinode.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_for_psft_and_for_the_crd(path: Path) -> None:
    job = _job(path)  # the same check as `psft validate`, or its expected errors
    document = yaml.safe_load(path.read_text())
    # the apiserver checks metadata as ObjectMeta; a CRD schema constrains only the name
    jsonschema.validate(
        {**document, "metadata": {"name": document["metadata"]["name"]}}, crd_schema()
    )
    assert job.metadata.name == document["metadata"]["name"]


def test_qwen_limo_uses_the_seed_hyperparameters() -> None:
    p = load_job(REPO / "examples" / "qwen2.5-7b-limo.yaml").spec.psft
    seed = (p.batch_size, p.mini_batch_size, p.learning_rate, p.warmup_steps, p.weight_decay)
    assert seed == (64, 8, 1e-6, 10, 0.1)
    assert (p.clip_ratio_low, p.clip_ratio_high, p.clip_ratio_c, p.grad_clip) == (
        0.2,
        0.28,
        10.0,
        1.0,
    )
    job = load_job(REPO / "examples" / "qwen2.5-7b-limo.yaml")
    assert job.spec.resources.gpus_per_node == 8 and job.spec.psft.objective == "psft"
    # issue 15: the loop and data settings of the seed's LIMO run (docs/seed-fidelity.md)
    d, e = job.spec.dataset, job.spec.eval
    assert (p.epochs, p.save_every, p.loss_agg_mode) == (25, 12, "micro-token-mean")
    assert (p.max_tokens_per_micro_batch, p.balance_batch) == (38912, True)
    assert (d.max_prompt_length, d.max_response_length, d.truncation) == (2048, 36864, "left")
    assert d.validation.fraction == 0.0 and not d.validation.files
    assert (e.samples, e.samples_per_benchmark, e.max_tokens, e.checkpoints) == (
        32, {"math500": 8, "minerva": 8}, 10240, "all",
    )  # fmt: skip
    baseline = load_job(REPO / "examples" / "qwen2.5-7b-limo-sft.yaml")
    assert baseline.spec.psft.objective == "sft"
    assert baseline.spec.dataset == job.spec.dataset


def _workflow(path: Path) -> dict[str, Any]:
    return json.loads(json.dumps(render_workflow(_job(path))))


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_workflows_use_the_chart_service_account_and_metrics_port(
    path: Path, helm_template: Render
) -> None:
    workflow = _workflow(path)
    sa = one(helm_template(), "ServiceAccount", "workflow")["metadata"]["name"]
    assert workflow["spec"]["serviceAccountName"] == sa
    values = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["podMonitor"]
    ports = {
        p["name"]
        for t in workflow["spec"]["templates"]
        for p in (t.get("container") or {}).get("ports") or []
    }
    assert ports <= {values["portName"], values["rayPortName"]}
    assert (
        workflow["spec"]["podMetadata"]["labels"]["psft.dev/job"]
        == workflow["metadata"]["labels"]["psft.dev/job"]
    ), "the PodMonitor selects stage pods by psft.dev/job"


def test_the_workflow_role_grants_what_the_rayjob_supervisor_calls(
    helm_template: Render,
) -> None:
    """Multi-node train steps run `psft rayjob` as the workflow ServiceAccount: its Role
    grants exactly the supervisor's calls, beside what Argo's executor needs."""
    from psft.trainer.rayjob import SUPERVISOR_RULES

    workflow = _workflow(REPO / "examples" / "multinode.yaml")
    train = next(t for t in workflow["spec"]["templates"] if t["name"] == "train")
    assert train["container"]["args"][0] == "rayjob"
    rules = one(helm_template({"workflows": {"rayJobs": True}}), "Role", "workflow")["rules"]
    executor = {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflowtaskresults"],
        "verbs": ["create", "patch"],
    }
    assert rules == [executor, *SUPERVISOR_RULES]
