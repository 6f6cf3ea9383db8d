"""Local inputs (model folders, data files, benchmark files, run roots) resolve in stage
processes exactly as `psft validate` and `psft run` resolve them (psft.workflows.paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from psft.trainer.storage import StorageError, fetch_uri
from psft.trainer.storage.uri import local_input
from psft.workflows.errors import UserError
from psft.workflows.paths import local_path


@pytest.mark.parametrize(
    "value",
    ["~/data/x.jsonl", "file:///data/x%20y.jsonl", "file://localhost/data/x.jsonl", "data/x"],
)
def test_stage_inputs_resolve_like_the_spec(value: str) -> None:
    assert local_input(value) == local_path(value) == fetch_uri(value)


@pytest.mark.parametrize(
    "value", ["file://data/x.jsonl", "http://host/x", "a\x00b", "~no_such_user_x/d"]
)
def test_a_value_that_names_no_local_path_is_a_user_error(value: str) -> None:
    with pytest.raises(UserError):
        local_input(value)


def test_a_file_uri_dataset_is_read_from_the_path_it_names(tmp_path: Path) -> None:
    from psft.trainer.data import _local

    data = tmp_path / "my data.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n')
    assert _local(data.as_uri()) == data


def test_a_run_root_of_another_scheme_is_refused() -> None:
    from servers.jobs import make_job, make_stage_config

    from psft.trainer.storage import open_run_store

    config = make_stage_config(make_job()).model_copy(update={"run_root": "gs://b/run"})
    with pytest.raises(StorageError, match="only local folders and s3:// URIs"):
        open_run_store(config)
