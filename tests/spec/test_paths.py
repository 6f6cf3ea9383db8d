"""Local paths, from a spec or the command line, are resolved one way everywhere: `~` and
`file://` URIs are expanded, and a value that names no usable path is a field error."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

from psft.workflows.paths import PathProblem, local_path, with_local_paths_resolved
from psft.workflows.validate import InvalidJob, validate_job

sys.path.insert(0, str(Path(__file__).parents[1] / "workflows"))
from workflow_examples import MINIMAL_JOB


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_local_path_expands_home_and_file_uris(home: Path) -> None:
    assert local_path("~") == home
    assert local_path("~/data/train.jsonl") == home / "data/train.jsonl"
    assert local_path("file:///data/train.jsonl") == Path("/data/train.jsonl")
    assert local_path("file:/data/train.jsonl") == Path("/data/train.jsonl")
    assert local_path("file://localhost/data/train.jsonl") == Path("/data/train.jsonl")
    assert local_path("FILE:///data/my%20set%231.jsonl") == Path("/data/my set#1.jsonl")
    assert local_path("file:///~/x") == Path("/~/x")  # a URI is absolute: no ~ in it
    assert local_path("data/train.jsonl") == Path("data/train.jsonl")  # relative stays so
    assert local_path("smollm2-135m-instruct") == Path("smollm2-135m-instruct")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("data/\x00train.jsonl", "NUL character"),
        ("file:///data/%00x", "NUL character"),
        ("data/\ud800.jsonl", "cannot be part of a file name"),
        ("file://data/train.jsonl", "file:///data/train.jsonl"),
        ("file://server/share/x", "names the host 'server'"),
        ("file:data/train.jsonl", "absolute"),
        ("file:///data/x.jsonl?v=2", "'?' or '#'"),
        ("http://example.com/train.jsonl", "http:// URIs are not supported"),
        ("gs://bucket/train.jsonl", "gs:// URIs are not supported"),
        ("~psft-no-such-user/train.jsonl", "no user 'psft-no-such-user'"),
        ("d/" + "x" * 256 + ".jsonl", "262 bytes, longer than the 255"),
        ("/".join(["abc"] * 1100), "longer than 4096 bytes"),
    ],
)
def test_local_path_refuses_values_that_name_no_path(value: str, expected: str) -> None:
    with pytest.raises(PathProblem, match=None) as info:
        local_path(value)
    assert expected in str(info.value)
    assert len(str(info.value)) < 400


def _with(where: str, value: str) -> dict[str, Any]:
    doc = copy.deepcopy(MINIMAL_JOB)
    spec = doc["spec"]
    if where == "spec.model.source":
        spec["model"]["source"] = value
    elif where == "spec.dataset.train[0]":
        spec["dataset"]["train"] = [value]
    elif where == "spec.dataset.validation.files[0]":
        spec["dataset"]["validation"] = {"files": [value]}
    elif where == "spec.grpo.prompts[0]":
        spec["grpo"] = {"enabled": True, "prompts": [value]}
    elif where == "spec.eval.benchmarks[0].path":
        spec["eval"] = {"benchmarks": [{"name": "mine", "path": value}]}
    elif where == "spec.storage.local.path":
        spec["storage"] = {"local": {"path": value}}
    elif where == "spec.storage.s3.caBundle":
        spec["storage"] = {"type": "s3", "s3": {"endpoint": "s3:9000", "bucket": "bkt"}}
        spec["storage"]["s3"]["caBundle"] = value
    return doc


PATH_FIELDS = [
    "spec.model.source",
    "spec.dataset.train[0]",
    "spec.dataset.validation.files[0]",
    "spec.grpo.prompts[0]",
    "spec.eval.benchmarks[0].path",
    "spec.storage.local.path",
    "spec.storage.s3.caBundle",
]


@pytest.mark.parametrize("where", PATH_FIELDS)
@pytest.mark.parametrize(
    "value",
    ["a\x00b", "~psft-no-such-user/x", "file://host/x", "ftp://h/x", "x" * 300],
    ids=["nul", "unknown-user", "file-uri-with-host", "other-scheme", "name-too-long"],
)
def test_a_path_field_that_names_no_path_is_a_field_error(where: str, value: str) -> None:
    with pytest.raises(InvalidJob) as info:
        validate_job(_with(where, value))
    assert [e.path for e in info.value.errors] == [where]


@pytest.mark.parametrize("where", PATH_FIELDS)
def test_every_path_field_accepts_home_and_file_uris(where: str, home: Path) -> None:
    validate_job(_with(where, "~/x"))
    validate_job(_with(where, "file:///srv/x"))


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        ("spec.storage.local.path", "s3://bucket/runs", "spec.storage.type: s3"),
        ("spec.storage.s3.caBundle", "s3://bucket/ca.pem", "a local file"),
        ("spec.dataset.train[0]", "s3://", "no bucket"),
        ("spec.model.source", "s3:///models/x", "no bucket"),
        ("spec.storage.local.path", "file:///", "root folder"),
        ("spec.storage.local.path", "file://localhost//", "root folder"),
    ],
)
def test_s3_uris_and_the_root_folder_where_they_do_not_belong(
    where: str, value: str, expected: str
) -> None:
    with pytest.raises(InvalidJob) as info:
        validate_job(_with(where, value))
    [error] = info.value.errors
    assert error.path == where and expected in error.message


def test_s3_uris_stay_accepted() -> None:
    validate_job(_with("spec.dataset.train[0]", "s3://bucket/data/train.jsonl"))
    validate_job(_with("spec.model.source", "s3://bucket/models/x"))


def test_resolving_a_job_expands_every_local_path_and_keeps_the_rest(home: Path) -> None:
    doc = copy.deepcopy(MINIMAL_JOB)
    doc["spec"].update(
        model={"source": "~/models/tiny"},
        dataset={"train": ["file:///data/a.jsonl", "rel/b.jsonl", "s3://bkt/c.jsonl"]},
        grpo={"enabled": True, "prompts": ["~/p.jsonl"]},
        eval={"benchmarks": ["aime24", {"name": "mine", "path": "file://localhost/e.jsonl"}]},
        storage={"local": {"path": "~/runs"}},
    )
    job = with_local_paths_resolved(validate_job(doc))
    assert job.spec.model.source == str(home / "models/tiny")
    assert job.spec.dataset.train == ["/data/a.jsonl", "rel/b.jsonl", "s3://bkt/c.jsonl"]
    assert job.spec.grpo.prompts == [str(home / "p.jsonl")]
    assert job.spec.eval.benchmarks[0] == "aime24"
    assert job.spec.eval.benchmarks[1].path == "/e.jsonl"  # type: ignore[union-attr]
    assert job.spec.storage.local.path == str(home / "runs")
    registered = validate_job(MINIMAL_JOB)
    assert with_local_paths_resolved(registered) == registered


def test_context_length_is_read_from_a_home_relative_model_folder(home: Path) -> None:
    (home / "model").mkdir()
    (home / "model" / "config.json").write_text('{"max_position_embeddings": 2048}')
    doc = copy.deepcopy(MINIMAL_JOB)
    doc["spec"]["model"]["source"] = "~/model"
    doc["spec"]["dataset"]["maxResponseLength"] = 2000
    with pytest.raises(InvalidJob, match=r"context length \(2048\)"):
        validate_job(doc)
