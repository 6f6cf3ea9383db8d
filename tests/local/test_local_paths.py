"""`psft run` resolves local paths one way (`~`, `file://`), refuses values that name no
folder with a clear error, and reads run folders without trusting what is in them."""

from __future__ import annotations

from pathlib import Path

import pytest

from psft.workflows.errors import UserError
from psft.workflows.local import _prepare_run_dir, local_job, run_local
from psft.workflows.pipeline import build_pipeline
from psft.workflows.stages import stage_config
from psft.workflows.validate import validate_job


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def job_doc(**spec: dict) -> dict:
    doc = {
        "metadata": {"name": "tiny"},
        "spec": {"model": {"source": "m"}, "dataset": {"train": ["~/train.jsonl"]}},
    }
    doc["spec"].update(spec)
    return doc


@pytest.mark.parametrize("storage_path", ["~/runs", "file://{home}/runs"])
def test_a_home_or_file_uri_storage_path_is_where_the_run_goes(
    home: Path, tmp_path: Path, storage_path: str
) -> None:
    doc = job_doc(storage={"local": {"path": storage_path.format(home=home)}})
    job = local_job(validate_job(doc), runs_dir=None)
    run_dir = _prepare_run_dir(job, fresh=False)
    assert run_dir == home / "runs" / "tiny" and (run_dir / ".psft-run").is_file()
    assert not (tmp_path / "~").exists() and not (tmp_path / "file:").exists()


@pytest.mark.parametrize("runs_dir", ["~/elsewhere", "file://{home}/elsewhere"])
def test_runs_dir_is_resolved_like_the_spec(home: Path, runs_dir: str) -> None:
    job = local_job(validate_job(job_doc()), runs_dir=runs_dir.format(home=home))
    assert _prepare_run_dir(job, fresh=False) == home / "elsewhere" / "tiny"


def test_stage_configs_carry_resolved_paths(home: Path) -> None:
    doc = job_doc(eval={"benchmarks": [{"name": "mine", "path": "file:///srv/bench.jsonl"}]})
    job = local_job(validate_job(doc), runs_dir="~/runs")
    for stage in build_pipeline(job):
        config = stage_config(job, stage, "~/ignored").job.spec
        assert config.dataset.train == [str(home / "train.jsonl")]
        assert config.eval.benchmarks[0].path == "/srv/bench.jsonl"  # type: ignore[union-attr]
        assert config.storage.local.path == str(home / "runs")


@pytest.mark.parametrize(
    ("runs_dir", "expected"),
    [
        ("~psft-no-such-user/runs", "no user 'psft-no-such-user'"),
        ("s3://bucket/runs", "spec.storage.type: s3"),
        ("file://host/runs", "names the host 'host'"),
        ("file:///", "root folder"),
        ("r" * 100_000, "longer than"),
        ("runs/" + "r" * 300, "300 bytes, longer than the 255"),
    ],
)
def test_a_runs_dir_that_names_no_folder_is_one_short_error(
    home: Path, runs_dir: str, expected: str
) -> None:
    job = validate_job(job_doc())
    with pytest.raises(UserError) as info:
        run_local(job, runs_dir=runs_dir)
    message = str(info.value)
    assert message.startswith("--runs-dir") and expected in message
    assert len(message) < 600
    assert not list(Path.cwd().glob("r*")) and not (Path.cwd() / "s3:").exists()


def test_a_users_folder_with_an_unreadable_spec_yaml_is_refused_untouched(home: Path) -> None:
    folder = home / "runs" / "tiny"
    folder.mkdir(parents=True)
    nested = "a: " + "[" * 5000 + "]" * 5000 + "\n"
    (folder / "spec.yaml").write_text(nested)
    job = local_job(validate_job(job_doc(storage={"local": {"path": "~/runs"}})), None)
    for fresh in (False, True):
        with pytest.raises(UserError, match="holds no psft run"):
            _prepare_run_dir(job, fresh=fresh)
    assert [p.name for p in folder.iterdir()] == ["spec.yaml"]
    assert (folder / "spec.yaml").read_text() == nested


def test_a_run_whose_spec_yaml_was_damaged_asks_for_fresh(home: Path) -> None:
    job = local_job(validate_job(job_doc(storage={"local": {"path": "~/runs"}})), None)
    run_dir = _prepare_run_dir(job, fresh=False)
    (run_dir / "spec.yaml").write_bytes(b"\xff\xfe\x00 not a spec")
    with pytest.raises(UserError, match="--fresh"):
        _prepare_run_dir(job, fresh=False)
    assert _prepare_run_dir(job, fresh=True) == run_dir
