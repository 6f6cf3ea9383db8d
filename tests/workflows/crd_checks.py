"""Checks of documents against the generated CRD without an API server, for the tests."""

from __future__ import annotations

from typing import Any

import celpy
import jsonschema

from psft.workflows import crd as crd_mod


def cel_failures(doc: dict[str, Any], openapi: dict[str, Any]) -> list[tuple[str, str]]:
    """Evaluate every CEL rule of the CRD the way the API server does (after defaulting):
    the rules of each node present in the document, sections, list items and map fields
    alike."""
    return cel_walk(crd_mod.apply_defaults(doc, openapi), openapi, "", celpy.Environment())


def cel_walk(value: Any, schema: dict[str, Any], path: str, env: Any) -> list[tuple[str, str]]:
    if value is None:  # a nullable field set to null: the API server runs no rule on it
        return []
    failed = []
    for rule in schema.get("x-kubernetes-validations", []):
        result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        if not isinstance(result, celpy.celtypes.BoolType):
            raise AssertionError(f"{path}: {rule['rule']} gave {result!r}")
        if not result:
            failed.append((path + rule.get("fieldPath", ""), rule["message"]))
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = schema.get("properties", {}).get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                failed += cel_walk(child, sub, f"{path}.{key}".lstrip("."), env)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            failed += cel_walk(child, schema["items"], f"{path}[{i}]", env)
    return failed


def crd_errors(doc: dict[str, Any], openapi: dict[str, Any]) -> list[str]:
    """Everything the API server would refuse in `doc`: schema errors (strict field
    validation, after defaulting), else the CEL rules that fail, as `path: message`."""
    schema = crd_mod.to_json_schema(openapi)
    defaulted = crd_mod.apply_defaults(doc, openapi)
    validator = jsonschema.Draft202012Validator(schema)
    found = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(defaulted)
    ]
    if found:  # CEL only on a well-typed document: celpy would trip over mistyped values
        return found
    return [f"{path}: {message}" for path, message in cel_failures(doc, openapi)]
