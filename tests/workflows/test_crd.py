"""The generated CRD: committed copy, structural-schema rules, defaults, CEL rules, examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
from crd_checks import cel_failures as _cel_failures
from workflow_examples import EXPECTED_ERRORS, REPO, example_files, psftjob_docs

from psft.workflows import crd as crd_mod
from psft.workflows.descriptions import FALLBACK
from psft.workflows.formats import LABEL_VALUE
from psft.workflows.spec import PSFTJob
from psft.workflows.status import CONDITION_TYPES, PSFTJobStatus
from psft.workflows.validate import InvalidJob, validate_job

JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def test_committed_crd_matches_the_model() -> None:
    committed = (REPO / crd_mod.CRD_FILE).read_text()
    assert committed == crd_mod.crd_yaml(), (
        f"{crd_mod.CRD_FILE} is stale: run `psft crd > {crd_mod.CRD_FILE}`"
    )


def test_crd_is_a_valid_kubernetes_object(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, "1.37.0", strict=True)


def test_crd_names(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "psftjobs.psft.dev"
    assert spec["group"] == "psft.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "PSFTJob" and spec["names"]["shortNames"] == ["psft"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Stage", "Step", "Entropy", "Best Avg@k", "Age"]


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _structural_errors(schema: dict[str, Any]) -> list[str]:
    """Kubernetes' structural-schema rules (apiextensions v1), checked node by node."""
    errors = []
    for path, node in _walk(schema):
        open_node = node.get("x-kubernetes-preserve-unknown-fields") is True
        if not node.get("type") and not open_node and not node.get("x-kubernetes-int-or-string"):
            errors.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            errors.append(f"{path}: properties and additionalProperties are exclusive")
        if node.get("additionalProperties") is False:
            errors.append(f"{path}: additionalProperties false is not allowed")
        for junctor in JUNCTORS:
            for sub in node.get(junctor, []) if junctor != "not" else [node.get("not", {})]:
                for key in ("type", "description", "default", "nullable", "additionalProperties"):
                    if key in sub:
                        errors.append(f"{path}.{junctor}: {key} inside a logical junctor")
        if node.get("x-kubernetes-list-type") == "map":
            items = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                defaulted = "default" in items["properties"][key]
                if key not in items.get("required", []) and not defaulted:
                    errors.append(f"{path}: list-map key {key} must be required or defaulted")
        if "$ref" in node or "definitions" in node or "$defs" in node:
            errors.append(f"{path}: references are not allowed in a CRD")
    metadata = schema["properties"]["metadata"]
    if set(metadata.get("properties", {})) - {"name", "generateName"}:
        errors.append("metadata: only name and generateName may be restricted")
    if set(metadata) - {"type", "properties"}:
        errors.append("metadata: nothing but type and properties may be set")
    return errors


def test_schema_is_structural(openapi: dict[str, Any]) -> None:
    assert _structural_errors(openapi) == []


def test_structural_checker_catches_violations(openapi: dict[str, Any]) -> None:
    broken = copy.deepcopy(openapi)
    psft = broken["properties"]["spec"]["properties"]["psft"]
    psft["additionalProperties"] = False
    del psft["properties"]["seed"]["type"]
    psft["properties"]["epochs"]["anyOf"] = [{"type": "integer"}]
    errors = _structural_errors(broken)
    assert len(errors) == 4, errors


def test_every_field_has_a_description(openapi: dict[str, Any]) -> None:
    missing = [
        path
        for path, node in _walk(openapi["properties"]["spec"], ".spec")
        if not node.get("description") and not path.endswith(("[]", "{}"))
    ]
    assert missing == []


def test_fallback_descriptions_do_not_shadow_docstrings() -> None:
    classes = crd_mod._model_classes(PSFTJob)
    for key in FALLBACK:
        cls_name, field = key.split(".")
        assert cls_name in classes, f"{key}: no such model"
        info = classes[cls_name].model_fields.get(field)
        assert info is not None, f"{key}: no such field"
        assert not info.description, f"{key}: the model has a docstring now; drop the fallback"


def test_constraints_carried_over(openapi: dict[str, Any]) -> None:
    spec = openapi["properties"]["spec"]["properties"]
    psft = spec["psft"]["properties"]
    assert psft["objective"]["enum"] == ["psft", "sft"]
    assert psft["batchSize"] == {
        "description": psft["batchSize"]["description"],
        "type": "integer",
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 65536,
        "default": 64,
    }
    assert psft["clipRatioLow"]["maximum"] == 1.0 and psft["clipRatioLow"]["exclusiveMaximum"]
    assert spec["dataset"]["properties"]["train"]["minItems"] == 1
    assert spec["dataset"]["required"] == ["train"]
    assert spec["model"]["properties"]["chatTemplate"]["nullable"] is True
    node_selector = spec["resources"]["properties"]["nodeSelector"]
    assert node_selector["additionalProperties"] == {
        "type": "string",
        "pattern": LABEL_VALUE,
        "maxLength": 63,
    }
    assert node_selector["maxProperties"] == 64  # bounds the cost of its CEL rule on keys
    name = openapi["properties"]["metadata"]["properties"]["name"]
    assert name["maxLength"] == 52 and name["pattern"].startswith("^[a-z0-9]")


def test_api_server_defaults_equal_the_model_defaults(
    openapi: dict[str, Any], minimal_doc: dict[str, Any]
) -> None:
    defaulted = crd_mod.apply_defaults(minimal_doc, openapi)
    assert defaulted["spec"]["psft"]["batchSize"] == 64
    assert defaulted["spec"]["eval"]["benchmarks"] == ["aime24", "aime25", "amc23"]
    from_server = PSFTJob.model_validate(defaulted).to_wire()
    from_model = PSFTJob.model_validate(minimal_doc).to_wire()
    assert from_server == from_model
    # and every default the server writes is itself valid (Kubernetes requires it)
    jsonschema.validate(defaulted, crd_mod.to_json_schema(openapi))


def test_cel_rules_accept_a_minimal_job(openapi, minimal_doc) -> None:
    assert _cel_failures(minimal_doc, openapi) == []


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"psft": {"batchSize": 64, "miniBatchSize": 12}}, "spec.psft.miniBatchSize"),
        ({"psft": {"batchSize": 8, "miniBatchSize": 16}}, "spec.psft.miniBatchSize"),
        ({"psft": {"miniBatchSize": 8, "microBatchSize": 3}}, "spec.psft.microBatchSize"),
        ({"grpo": {"enabled": True}}, "spec.grpo.prompts"),
        (
            {"grpo": {"enabled": True, "prompts": ["p.jsonl"], "miniBatchSize": 5}},
            "spec.grpo.miniBatchSize",
        ),
        ({"storage": {"type": "s3"}}, "spec.storage.s3"),
        ({"resources": {"nodes": 2}, "psft": {"engine": "native"}}, "spec.psft.engine"),
        ({"resources": {"nodes": 2, "gpusPerNode": 0}}, "spec.resources.gpusPerNode"),
    ],
)
def test_cel_rules_agree_with_validate_job(openapi, minimal_doc, patch, field) -> None:
    doc = copy.deepcopy(minimal_doc)
    for section, values in patch.items():
        doc["spec"].setdefault(section, {}).update(values)
    failures = _cel_failures(doc, openapi)
    assert [f for f, _ in failures] == [field]
    with pytest.raises(InvalidJob) as exc:
        validate_job(doc)
    assert field in [e.path for e in exc.value.errors]
    # the fieldPath of each rule must name a field the schema has
    node = openapi
    for part in field.split("."):
        node = node["properties"][part]


def test_strict_schema_rejects_unknown_and_mistyped_fields(openapi, minimal_doc) -> None:
    schema = crd_mod.to_json_schema(openapi)
    jsonschema.validate(minimal_doc, schema)
    for spec_patch in (
        {"psft": {"batchsize": 64}},
        {"psft": {"batchSize": "64"}},
        {"psft": {"batchSize": 0}},
        {"psft": {"objective": "dpo"}},
        {"dataset": {"train": []}},
        {"eval": {"topP": 1.5}},
    ):
        doc = copy.deepcopy(minimal_doc)
        for section, values in spec_patch.items():
            doc["spec"].setdefault(section, {}).update(values)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema)
    doc = copy.deepcopy(minimal_doc)
    doc["metadata"]["name"] = "Not_A_DNS_Label"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_custom_and_registered_benchmarks_pass_the_schema(openapi, minimal_doc) -> None:
    doc = copy.deepcopy(minimal_doc)
    doc["spec"]["eval"] = {"benchmarks": ["math500", {"name": "mine", "path": "m.jsonl"}]}
    jsonschema.validate(doc, crd_mod.to_json_schema(openapi))
    validate_job(doc)


def test_status_schema_matches_the_status_model(openapi: dict[str, Any]) -> None:
    status = PSFTJobStatus.model_validate(
        {
            "phase": "Running",
            "observedGeneration": 2,
            "workflowName": "psft-tiny",
            "stage": "train",
            "progress": "120/216",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                for t in CONDITION_TYPES
            ],
            "stages": {"train": {"phase": "Running", "progress": "120/216"}},
            "metrics": {"step": 120, "totalSteps": 216, "entropy": 0.61, "ratioMax": 1.3},
            "evalResults": {"eval/aime24": {"avgAtK": 0.2, "k": 32}},
            "bestAvgAtK": 0.2,
            "artifacts": {"runRoot": "s3://b/psft/ns/tiny/uid"},
        }
    ).to_wire()
    schema = crd_mod.to_json_schema(openapi)
    jsonschema.validate({"spec": {}, "status": status} | {"spec": _spec_ok()}, schema)
    assert status["metrics"]["ratioMax"] == 1.3  # extra metrics are kept, not pruned
    # the printer columns read fields that exist
    for column in crd_mod.PRINTER_COLUMNS:
        node = openapi
        parts = column["jsonPath"].strip(".").split(".")
        if parts[0] == "metadata":
            continue
        for part in parts:
            node = node["properties"][part]
        assert node["type"] == column["type"] or column["type"] == "date"


def _spec_ok() -> dict[str, Any]:
    return {"model": {"source": "m"}, "dataset": {"train": ["t.jsonl"]}}


EXAMPLES = example_files()


def test_examples_exist() -> None:
    assert REPO / "examples" / "quickstart.yaml" in EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_passes_crd_schema_cel_and_validation(path: Path, openapi) -> None:
    schema = crd_mod.to_json_schema(openapi)
    for doc in psftjob_docs(path):
        jsonschema.validate(doc, schema)
        jsonschema.validate(crd_mod.apply_defaults(doc, openapi), schema)
        assert _cel_failures(doc, openapi) == []
        expected = EXPECTED_ERRORS.get(path.name)
        if expected is None:
            validate_job(doc, str(path))
            continue
        # the API server admits it; the operator's validation refuses it (phase Invalid)
        with pytest.raises(InvalidJob) as exc:
            validate_job(doc, str(path))
        assert sorted({e.path for e in exc.value.errors}) == sorted(expected)


def _defaults_with_rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, Any, dict]]:
    """Every (path, default, schema node) in the CRD schema."""
    found = []
    if "default" in schema:
        found.append((path, schema["default"], schema))
    for key, sub in schema.get("properties", {}).items():
        found += _defaults_with_rules(sub, f"{path}.{key}".lstrip("."))
    if isinstance(schema.get("items"), dict):
        found += _defaults_with_rules(schema["items"], f"{path}[]")
    return found


def _rule_errors_on(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Every CEL rule of `schema` and of its nested nodes, run against `value` as it is:
    what the API server does with each default when the CRD is created (it does not fill
    the nested defaults first)."""
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            result = env.program(env.compile(rule["rule"])).evaluate(
                {"self": celpy.json_to_cel(value)}
            )
        except celpy.CELEvalError as exc:
            errors.append(f"{path}: {rule['rule']}: {exc}")
            continue
        if isinstance(result, celpy.CELEvalError) or not result:
            errors.append(f"{path}: {rule['rule']}: {result!r}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += _rule_errors_on(value[key], sub, f"{path}.{key}")
    return errors


def test_every_cel_rule_holds_on_every_default(openapi: dict[str, Any]) -> None:
    defaults = _defaults_with_rules(openapi)
    with_rules = [path for path, _, node in defaults if "x-kubernetes-validations" in node]
    assert {"spec.psft", "spec.grpo", "spec.storage"} <= set(with_rules)
    errors = [e for path, value, node in defaults for e in _rule_errors_on(value, node, path)]
    assert errors == []


def test_object_defaults_carry_their_nested_defaults(openapi: dict[str, Any]) -> None:
    psft = crd_mod._at(openapi, "spec.psft")
    assert psft["default"]["batchSize"] == 64 and psft["default"]["miniBatchSize"] == 8
    # the nested default equals what the API server would fill into `{}`
    assert psft["default"] == crd_mod.apply_defaults({}, psft)
