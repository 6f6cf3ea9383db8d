"""docs/psftjob.md: generated from the schema, committed, complete."""

from __future__ import annotations

import json
import re

from workflow_examples import REPO

from psft.workflows.cli import main
from psft.workflows.crd import CEL_RULES, build_crd
from psft.workflows.reference import DOC_FILE, reference_markdown


def test_committed_reference_matches_the_schema() -> None:
    committed = (REPO / DOC_FILE).read_text()
    assert committed == reference_markdown(), f"{DOC_FILE} is stale: run `psft docs > {DOC_FILE}`"


def _leaf_paths(node: dict, path: str) -> list[tuple[str, str, dict]]:
    out = []
    for key, child in node.get("properties", {}).items():
        out.append((path, key, child))
        out += _leaf_paths(child, f"{path}.{key}")
    for suffix, sub in (("[]", node.get("items")), ("{}", node.get("additionalProperties"))):
        if isinstance(sub, dict):
            out += _leaf_paths(sub, path + suffix)
    return out


def test_every_field_is_documented_with_type_default_and_allowed_values() -> None:
    text = reference_markdown()
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    sections = dict(re.findall(r"### `([^`]+)`\n(.*?)(?=\n### |\n## |\Z)", text, re.S))
    fields = _leaf_paths(schema["properties"]["spec"], "spec")
    fields += _leaf_paths(schema["properties"]["status"], "status")
    assert len(fields) > 100
    for section, key, node in fields:
        table = sections[section]
        (row,) = [line for line in table.splitlines() if line.startswith(f"| `{key}`")]
        default = node.get("default")
        if "properties" in node and default is not None:
            assert "see fields" in row, row  # an object's default is its fields' defaults
        elif default not in (None, {}):
            shown = default if isinstance(default, str) else json.dumps(default)
            assert f"`{shown}`" in row, row
        for value in node.get("enum", []):
            assert f"`{value}`" in row
        if node.get("description"):
            assert node["description"].replace("|", "\\|") in row
    for rules in CEL_RULES.values():
        for rule in rules:
            assert rule["message"] in text


def test_cli_prints_crd_and_docs(capsys) -> None:
    assert main(["docs"]) == 0
    assert capsys.readouterr().out == reference_markdown()
    assert main(["crd"]) == 0
    assert "name: psftjobs.psft.dev" in capsys.readouterr().out


def test_every_link_has_an_anchor() -> None:
    text = reference_markdown()
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors, links - anchors
