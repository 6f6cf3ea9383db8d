"""What we render, against the CRD schemas of every Argo Workflows and KubeRay release the
chart supports (Chart.yaml: psft.dev/targets), read from those releases' own Go modules.

The real-cluster tests run one version of each; here every rendered Workflow (the examples,
multi-node included) is checked against each supported Argo release's full Workflow CRD,
and every RayJob against each KubeRay release's RayJob CRD, with unknown fields reported:
an API server with a structural schema silently drops a field it does not know, so a field
that only newer releases have must be one we accept losing (listed, with why).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_argo import rendered_examples

from psft.workflows import argo_ray
from psft.workflows.crd import to_json_schema
from psft.workflows.pipeline import build_pipeline

pytestmark = pytest.mark.integration  # modules come from the Go module proxy (then cached)

# The newest release of each supported minor that the module proxy serves here (v3.6.19,
# v4.0.0-v4.1.x and KubeRay v1.7.0 are refused by it).
ARGO_RELEASES = {
    "v3.6.18": "github.com/argoproj/argo-workflows/v3",
    "v3.7.18": "github.com/argoproj/argo-workflows/v3",
    "v4.0.5": "github.com/argoproj/argo-workflows/v4",
}
KUBERAY_RELEASES = ("v1.4.2", "v1.5.1", "v1.6.0")
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"

DROPPED_BY = {
    # Argo < 3.7 has no backoff cap: the delays between retries keep doubling there
    # (argo.retry_strategy's docstring), which costs time, never a retry
    "v3.6.18": {"retryStrategy.backoff.cap"},
}


@cache
def module_dir(module: str, version: str) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs Go (the module proxy serves the releases' CRDs)")
    proc = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    info = json.loads(proc.stdout or "{}")
    assert proc.returncode == 0 and "Dir" in info, f"{module}@{version}: {info or proc.stderr}"
    return Path(info["Dir"])


def crd_schema(path: Path) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return to_json_schema(version["schema"]["openAPIV3Schema"])


def unknown_and_invalid(obj: dict[str, Any], schema: dict[str, Any]) -> tuple[set[str], list[str]]:
    """(paths of fields the schema does not know, other schema errors)."""
    bare = {**obj, "metadata": {"name": obj["metadata"]["name"]}}  # checked as ObjectMeta
    unknown: set[str] = set()
    invalid: list[str] = []
    for error in jsonschema.Draft7Validator(schema).iter_errors(bare):
        where = ".".join(str(p) for p in error.absolute_path if not isinstance(p, int))
        if error.validator == "additionalProperties":
            extra = set(error.instance) - set(error.schema.get("properties", {}))
            unknown |= {f"{where}.{key}".split("templates.", 1)[-1] for key in extra}
        else:
            invalid.append(f"{where}: {error.message}")
    return unknown, invalid


@pytest.fixture(scope="module")
def workflows() -> list[tuple[str, dict[str, Any]]]:
    rendered = [(f"{path.name}:{job.metadata.name}", wf) for path, job, wf in rendered_examples()]
    assert len(rendered) >= 5 and any("multinode" in name for name, _ in rendered)
    return rendered


@pytest.mark.parametrize("version", ARGO_RELEASES)
def test_every_rendered_workflow_fits_each_supported_argo_release(version, workflows) -> None:
    folder = module_dir(ARGO_RELEASES[version], version)
    schema = crd_schema(folder / "manifests/base/crds/full/argoproj.io_workflows.yaml")
    dropped: set[str] = set()
    for name, wf in workflows:
        unknown, invalid = unknown_and_invalid(wf, schema)
        assert not invalid, (version, name, invalid)
        dropped |= unknown
    assert dropped == DROPPED_BY.get(version, set()), version


@pytest.mark.parametrize("version", KUBERAY_RELEASES)
def test_every_rendered_rayjob_fits_each_supported_kuberay_release(version) -> None:
    folder = module_dir(KUBERAY_MODULE, version)
    schema = crd_schema(folder / "config/crd/bases/ray.io_rayjobs.yaml")
    rayjobs = []
    for path, job, _ in rendered_examples():
        if job.spec.resources.nodes > 1:
            train = next(s for s in build_pipeline(job) if s.kind == "train")
            rayjobs.append((path.name, argo_ray.rayjob(job, train)))
    assert rayjobs
    for name, rayjob in rayjobs:
        unknown, invalid = unknown_and_invalid(rayjob, schema)
        assert not invalid and not unknown, (version, name, invalid, unknown)
        assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == argo_ray.RAY_VERSION
