"""LocalRunStore: the default storage of `psft run`, and the marker protocol on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from servers.jobs import make_job, make_stage_config

from psft.trainer.storage import (
    LocalRunStore,
    MissingArtifact,
    StorageError,
    fetch_uri,
    open_run_store,
)
from psft.trainer.storage.base import parse_marker, steps_to_prune
from psft.workflows import layout


@pytest.fixture
def store(tmp_path: Path) -> LocalRunStore:
    job = make_job(storage={"type": "local", "local": {"path": str(tmp_path / "runs")}})
    opened = open_run_store(make_stage_config(job))
    assert isinstance(opened, LocalRunStore)
    return opened


def write_checkpoint(store: LocalRunStore, step: int) -> Path:
    folder = store.checkpoint_dir("train", step)
    (folder / "model.safetensors").write_bytes(bytes([step % 256]) * 1000)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def test_work_dir_is_the_run_root(store: LocalRunStore, tmp_path: Path) -> None:
    assert store.work_dir == (tmp_path / "runs" / "demo").resolve()
    assert store.work_dir.is_dir()


def test_pull_push_exists(store: LocalRunStore) -> None:
    assert not store.exists(layout.DATA_TRAIN)
    with pytest.raises(MissingArtifact, match=r"data/train\.parquet is missing"):
        store.pull(layout.DATA_TRAIN)
    path = store.local_path(layout.DATA_TRAIN)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"rows")
    store.push(layout.DATA_TRAIN)
    assert store.exists(layout.DATA_TRAIN)
    assert store.pull(layout.DATA_TRAIN).read_bytes() == b"rows"
    with pytest.raises(MissingArtifact):
        store.push("train/final")


@pytest.mark.parametrize("key", ["../escape", "/abs/../x", "", "a//b"])
def test_bad_keys_are_refused(store: LocalRunStore, key: str) -> None:
    with pytest.raises(StorageError, match="invalid artifact key"):
        store.local_path(key)


def test_marker_names_the_committed_step_and_old_ones_are_pruned(store: LocalRunStore) -> None:
    assert store.latest_checkpoint("train") is None
    for step in (2, 4, 6):
        write_checkpoint(store, step)
        store.commit_checkpoint("train", step)
        assert store.latest_checkpoint("train") == step
    folder = store.local_path(layout.checkpoints("train"))
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["step-4", "step-6"]


def test_crash_between_files_and_marker_keeps_the_old_checkpoint(store: LocalRunStore) -> None:
    write_checkpoint(store, 2)
    store.commit_checkpoint("train", 2)
    write_checkpoint(store, 4)  # files written, then the process dies: no commit
    assert store.latest_checkpoint("train") == 2
    # the rerun saves step 4 again: stale files of the first attempt are gone
    stale = store.local_path(layout.checkpoint("train", 4)) / "leftover.bin"
    stale.write_bytes(b"x")
    fresh = store.checkpoint_dir("train", 4)
    assert list(fresh.iterdir()) == []


def test_commit_of_a_missing_checkpoint_is_an_error(store: LocalRunStore) -> None:
    with pytest.raises(StorageError, match="missing or empty"):
        store.commit_checkpoint("train", 9)
    assert store.latest_checkpoint("train") is None


def test_damaged_marker_is_a_clear_error(store: LocalRunStore) -> None:
    marker = store.local_path(layout.latest_marker("train"))
    marker.parent.mkdir(parents=True)
    marker.write_text("garbage")
    with pytest.raises(StorageError, match="not a valid checkpoint marker"):
        store.latest_checkpoint("train")


def test_marker_format_and_prune_rule() -> None:
    assert parse_marker(b'{"step": 12, "checkpoint": "step-12"}', "m") == 12
    assert parse_marker(b"7\n", "m") == 7
    # keeps the 2 newest committed; leaves uncommitted newer steps alone
    assert steps_to_prune([1, 2, 3, 4, 5], latest=4, keep=2) == [1, 2]
    assert steps_to_prune([4], latest=4, keep=1) == []


def test_fetch_uri_passes_local_paths_and_names_through(tmp_path: Path) -> None:
    assert fetch_uri(str(tmp_path)) == tmp_path
    assert fetch_uri(f"file://{tmp_path}") == tmp_path
    assert fetch_uri("smollm2-135m-instruct") == Path("smollm2-135m-instruct")


def test_unsupported_scheme(tmp_path: Path) -> None:
    job = make_job()
    config = make_stage_config(job).model_copy(update={"run_root": "gs://bucket/x"})
    with pytest.raises(StorageError, match="only local folders and s3:// URIs are supported"):
        open_run_store(config)
