"""Every numeric field is finite and bounded, so a value that validates can also run.

The fields are found by walking the generated CRD schema (what the API server checks and
docs/psftjob.md shows) and, independently, the pydantic models (what `psft validate`
checks); a new numeric field without a maximum fails here.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from psft.workflows import argo
from psft.workflows.crd import spec_schema
from psft.workflows.pipeline import build_pipeline
from psft.workflows.spec import PSFTJob, PSFTJobSpec
from psft.workflows.stages import read_stage_config, stage_config
from psft.workflows.validate import InvalidJob, validate_job

sys.path.insert(0, str(Path(__file__).parents[1] / "workflows"))
from workflow_examples import MINIMAL_JOB

BASE = MINIMAL_JOB


def _crd_numeric(node: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    """Wire path (lists as `[0]`) -> schema node of every integer or number field."""
    out = {}
    if node.get("type") in ("integer", "number"):
        out[path] = node
    for key, child in node.get("properties", {}).items():
        out.update(_crd_numeric(child, f"{path}.{key}"))
    if isinstance(node.get("items"), dict):
        out.update(_crd_numeric(node["items"], f"{path}[0]"))
    if isinstance(node.get("additionalProperties"), dict):
        out.update(_crd_numeric(node["additionalProperties"], f"{path}.key"))
    return out


NUMERIC = _crd_numeric(spec_schema(), "spec")


def _leaf_types(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _leaf_types(arg)]
    return [annotation]


def _model_numeric(cls: type[BaseModel], path: str) -> set[str]:
    """The same paths, found from the pydantic models."""
    out: set[str] = set()
    for name, info in cls.model_fields.items():
        here = f"{path}.{info.alias or name}"
        for leaf in _leaf_types(info.annotation):
            if typing.get_origin(leaf) is list:
                leaf, here = typing.get_args(leaf)[0], here + "[0]"
            if typing.get_origin(leaf) is dict:
                leaf, here = typing.get_args(leaf)[1], here + ".key"
            for t in _leaf_types(leaf):
                if t in (int, float):
                    out.add(here)
                elif isinstance(t, type) and issubclass(t, BaseModel):
                    out |= _model_numeric(t, here)
    return out


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with `value` at a wire path such as spec.resources.tolerations[0].x."""
    doc = copy.deepcopy(BASE)
    node: Any = doc
    parts = path.split(".")
    for part in parts[:-1]:
        if part.endswith("[0]"):
            node = node.setdefault(part[:-3], [{}])[0]
        else:
            node = node.setdefault(part, {})
    node[parts[-1]] = value
    return doc


def _error_paths(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidJob) as info:
        validate_job(doc)
    return {e.path: e.message for e in info.value.errors}


def test_the_crd_and_the_models_list_the_same_numeric_fields() -> None:
    assert set(NUMERIC) == _model_numeric(PSFTJobSpec, "spec")
    assert len(NUMERIC) >= 40  # the walk found the fields, not nothing


@pytest.mark.parametrize("path", sorted(NUMERIC))
def test_every_numeric_field_has_a_maximum(path: str) -> None:
    node = NUMERIC[path]
    assert "maximum" in node, f"{path} has no maximum: add le= to the field in spec.py"
    assert math.isfinite(node["maximum"])
    assert "minimum" in node, f"{path} has no minimum"


@pytest.mark.parametrize("path", sorted(NUMERIC))
def test_above_the_maximum_is_rejected_by_field(path: str) -> None:
    node = NUMERIC[path]
    top = node["maximum"]
    over = [top + 1]
    if node["type"] == "number":
        over.append(math.nextafter(top, math.inf))
    if node.get("exclusiveMaximum"):
        over.append(top)
    for value in over:
        errors = _error_paths(_with(path, value))
        assert path in errors, (value, errors)
        named = re.search(r"(?:less than(?: or equal to)?|at most) ([-+.e\d]+)", errors[path])
        assert named and float(named.group(1)) == top, errors[path]  # the message names it


@pytest.mark.parametrize("path", sorted(NUMERIC))
def test_the_maximum_itself_passes_the_schema(path: str) -> None:
    node = NUMERIC[path]
    if node.get("exclusiveMaximum"):
        value = math.nextafter(node["maximum"], -math.inf)
    else:
        value = node["maximum"]
    PSFTJob.model_validate(_with(path, value))  # cross-field rules may still object


@pytest.mark.parametrize("path", sorted(p for p, n in NUMERIC.items() if n["type"] == "number"))
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "NaN"])
def test_floats_reject_inf_and_nan(path: str, value: Any) -> None:
    errors = _error_paths(_with(path, value))
    assert path in errors, errors
    assert "finite" in errors[path]


@pytest.mark.parametrize("path", sorted(p for p, n in NUMERIC.items() if n["type"] == "integer"))
@pytest.mark.parametrize("text", ["1e30", "1.0e+30", ".inf"])
def test_huge_yaml_integers_are_field_errors(path: str, text: str) -> None:
    value = yaml.safe_load(f"x: {text}")["x"]  # '1e30' is a string in YAML 1.1
    errors = _error_paths(_with(path, value))
    assert path in errors, errors
    message = errors[path]
    assert "finite" in message or f"at most {NUMERIC[path]['maximum']}" in message, message


def test_yaml_1e30_seed_names_the_field_and_its_bound() -> None:
    doc = yaml.safe_load(
        "apiVersion: psft.dev/v1alpha1\nkind: PSFTJob\nmetadata: {name: demo}\n"
        "spec:\n  model: {source: smollm2-135m-instruct}\n  dataset: {train: [d.jsonl]}\n"
        "  psft: {seed: 1e30, learningRate: .inf}\n"
    )
    assert _error_paths(doc) == {
        "spec.psft.seed": "must be a whole number at most 4294967295, written in digits "
        "(got '1e30')",
        "spec.psft.learningRate": "Input should be a finite number (got inf)",
    }


def test_assignment_cannot_bring_inf_back() -> None:
    job = validate_job(BASE)
    with pytest.raises(ValueError, match="finite"):
        job.spec.psft.learning_rate = math.inf


def _refuse(token: str) -> None:
    raise AssertionError(f"stage.json holds {token}, which is not JSON")


def _nulls(value: Any, path: str = "") -> list[str]:
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nulls(v, f"{path}[{i}]")]
    return []


def _at_bounds() -> dict[str, Any]:
    """An accepted spec with every float at its largest allowed value."""
    doc = copy.deepcopy(BASE)
    for path, node in NUMERIC.items():
        if node["type"] == "number":
            top = node["maximum"]
            value = math.nextafter(top, -math.inf) if node.get("exclusiveMaximum") else top
            doc = _merge(doc, _with(path, value))
    return doc


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a[k], b[k]) if k in a and k in b else b.get(k, a.get(k)) for k in a | b}
    return b


@pytest.mark.parametrize("doc", [BASE, _at_bounds()], ids=["defaults", "floats-at-maximum"])
def test_stage_json_round_trips(doc: dict[str, Any], tmp_path: Path) -> None:
    job = validate_job(doc)
    for stage in build_pipeline(job):
        for text in (
            stage_config(job, stage, str(tmp_path)).dump(),  # psft run
            argo.stage_config_json(job, stage),  # the Workflow
        ):
            data = json.loads(text, parse_constant=_refuse)  # no NaN / Infinity tokens
            assert not _nulls(data), _nulls(data)
            path = tmp_path / "stage.json"
            path.write_text(text)
            back = read_stage_config(path)
            assert back.job.spec == job.spec
            assert json.loads(back.dump()) == data
