"""The PSFTJob CRD on a real kube-apiserver 1.35: accepted, served, and enforcing its schema
(CEL rules, enums, bounds, unknown fields) with the field paths `psft validate` prints."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from psft.workflows.crd import _without_empty, build_crd
from psft.workflows.validate import InvalidJob, validate_job

pytestmark = pytest.mark.integration


def _job(name: str, **spec: Any) -> dict[str, Any]:
    doc = {
        "apiVersion": "psft.dev/v1alpha1",
        "kind": "PSFTJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"train": ["s3://data/train.jsonl"]},
            "storage": {"type": "s3", "s3": {"endpoint": "minio:9000", "bucket": "runs"}},
        },
    }
    for section, values in spec.items():
        doc["spec"].setdefault(section, {}).update(values)
    return doc


def _apply(kubectl, tmp_path: Path, doc: dict[str, Any]):  # type: ignore[no-untyped-def]
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return kubectl("create", "--validate=strict", "-f", str(path), check=False)


def test_crd_is_established_and_explained(psft_crd, kubectl) -> None:
    crd = json.loads(kubectl("get", "crd/psftjobs.psft.dev", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    # the OpenAPI document kubectl explain reads is published a few seconds after Established
    deadline = time.monotonic() + 60
    while (proc := kubectl("explain", "psftjob.spec.psft", check=False)).returncode != 0:
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(1)
    explained = proc.stdout
    assert "miniBatchSize" in explained and "clipRatioHigh" in explained


def test_the_server_rejects_a_crd_whose_object_default_breaks_its_cel_rules(kubectl, tmp_path):
    """What the real server does with `default: {}` next to CEL rules (the defect we shipped):
    it evaluates the rules against the default and rejects the CRD."""
    crd = build_crd()
    crd["metadata"]["name"] = "brokenjobs.psft.dev"
    crd["spec"]["names"] = {"kind": "BrokenJob", "plural": "brokenjobs", "singular": "brokenjob"}
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["properties"]["psft"]["default"] = {}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(crd))
    proc = kubectl("create", "-f", str(path), check=False)
    assert proc.returncode != 0
    assert "no such key: batchSize" in proc.stderr


def test_a_valid_job_is_stored_with_the_models_defaults(psft_crd, kubectl, tmp_path) -> None:
    doc = _job("valid-defaults")
    assert _apply(kubectl, tmp_path, doc).returncode == 0
    stored = json.loads(kubectl("get", "psftjob/valid-defaults", "-o", "json").stdout)
    # the server filled exactly the model's defaults (empty lists and objects are left out)
    assert _without_empty(stored["spec"]) == _without_empty(validate_job(doc).spec.to_wire())
    kubectl("delete", "psftjob/valid-defaults")


CASES = [
    ({"psft": {"batchSize": 64, "miniBatchSize": 12}}, "spec.psft.miniBatchSize"),
    ({"psft": {"miniBatchSize": 8, "microBatchSize": 3}}, "spec.psft.microBatchSize"),
    ({"psft": {"objective": "dpo"}}, "spec.psft.objective"),
    ({"psft": {"batchSize": 0}}, "spec.psft.batchSize"),
    ({"psft": {"clipRatioHigh": -1}}, "spec.psft.clipRatioHigh"),
    ({"psft": {"batchsize": 8}}, "spec.psft.batchsize"),
    ({"grpo": {"enabled": True}}, "spec.grpo.prompts"),
    ({"storage": {"type": "s3", "s3": None}}, "spec.storage.s3"),
    ({"eval": {"backend": "sglang"}}, "spec.eval.backend"),
]


@pytest.mark.parametrize(("patch", "field"), CASES, ids=[c[1] for c in CASES])
def test_the_server_rejects_what_validate_rejects_at_the_same_field(
    psft_crd, kubectl, tmp_path, patch, field
) -> None:
    doc = _job("invalid")
    for section, values in patch.items():
        doc["spec"][section] = {
            k: v for k, v in {**doc["spec"].get(section, {}), **values}.items() if v is not None
        }
    with pytest.raises(InvalidJob) as local:
        validate_job(copy.deepcopy(doc))
    assert field in {e.path for e in local.value.errors}
    proc = _apply(kubectl, tmp_path, doc)
    assert proc.returncode != 0, proc.stdout
    assert field in proc.stderr, proc.stderr


def test_argos_executor_builds_from_its_module_with_its_linux_signal_file() -> None:
    """argoexec (the executor real pods need) builds from the pinned Argo module once the
    build restores the repository's symbolic link signal_linux.go, which module zips drop."""
    import subprocess

    from servers.cluster.build import ensure_built

    argoexec = ensure_built("argo") / "bin" / "argoexec"
    out = subprocess.run([str(argoexec), "--help"], capture_output=True, text=True, check=True)
    for command in ("emissary", "init", "wait", "resource"):
        assert f"\n  {command} " in out.stdout, out.stdout
