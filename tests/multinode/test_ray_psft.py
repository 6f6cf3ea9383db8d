"""PSFT on a real two-node Ray cluster (tests/multinode/ray_cluster.py) against one process.

The same spec (tiny model, prepared rows, seed, batch 8, mini-batch 4, micro-batch 2) runs
once as one process (`resources.nodes: 1`, torchrun) and once on Ray with one CPU worker
per node (`nodes: 2`, gloo). With the global batch laid out per data-parallel rank
(ray_trainer.dispatch_order), each update sees the same rows, so loss, entropy, clip
fraction and grad norm agree per step. Tolerance 1e-5 relative: both runs are float32 and
differ only in summation order (gradients averaged by FSDP over two ranks, not summed
over two micro-batches in one); a different batch layout or a missed update moves these
numbers by >= 1e-3.

Then the worker node is killed mid-run: `psft train` fails with a clear one-line error
(exit 2); run again, it resumes from the last complete checkpoint and ends with the numbers
of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJob
from psft.workflows.stages import StageConfig

pytest.importorskip("verl")
pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a Ray cluster and an S3 server

REL_TOL = 1e-5
STEPS = 4
SAVE_EVERY = 2
COMPARED = (
    "loss",
    "entropy",
    "clip_fraction",
    "grad_norm",
    "nll",
    "ratio_mean",
    "ratio_max",
    "approx_kl",
    "learning_rate",
)


def write_data(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        a, b = i, i % 5
        answer = f"We add the numbers: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        rows.append({"prompt": f"What is {a} + {b}?", "demonstration": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_job(
    model: Path,
    data: Path,
    nodes: int,
    steps: int = STEPS,
    storage: dict | None = None,
    keep: int = 2,
) -> PSFTJob:
    return PSFTJob.model_validate(
        {
            "metadata": {"name": "multinode"},
            "spec": {
                **({"storage": storage} if storage else {}),
                "model": {"source": str(model)},
                "dataset": {
                    "train": [str(data)],
                    "maxPromptLength": 128,
                    "maxResponseLength": 128,
                    "validation": {"fraction": 0.25},
                },
                "psft": {
                    "engine": "verl",
                    "batchSize": 8,
                    "miniBatchSize": 4,
                    "microBatchSize": 2,
                    "maxSteps": steps,
                    "saveEvery": SAVE_EVERY,
                    "keepCheckpoints": keep,
                    "learningRate": 1e-3,
                    # a narrow trust region: updates 2-4 clip some tokens (ratios reach
                    # ~1.1), so the clip fraction compared is not a trivial 0
                    "clipRatioLow": 0.02,
                    "clipRatioHigh": 0.02,
                    "warmupSteps": 2,
                    "seed": 3,
                },
                "resources": {"device": "cpu", "nodes": nodes},
                "monitoring": {"metricsPort": 0},
            },
        }
    )


def stage(job: PSFTJob, kind: str, root: Path | str) -> StageConfig:
    return StageConfig(stage=kind, kind=kind, job=job, run_root=str(root), progress=False)


def all_records(root: Path) -> list[dict]:
    lines = (root / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def records(root: Path) -> list[dict]:
    """The training steps' records (step 0 is the held-out baseline before training)."""
    return [r for r in all_records(root) if r["step"] > 0]


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Prepared rows shared by every run of this module."""
    from psft.trainer import prepare

    base = tmp_path_factory.mktemp("multinode")
    data = write_data(base / "train.jsonl")
    prepare.run(stage(make_job(tiny_model_dir, data, nodes=1), "prepare", base / "prepared"))
    return base


def new_root(base: Path, name: str) -> Path:
    root = base / name
    shutil.copytree(base / "prepared" / "data", root / "data")
    return root


def train_as_the_rayjob_does(config: StageConfig, folder: Path) -> str:
    """`psft train --config` in a process of its own, as a RayJob's entrypoint runs it (a
    driver inside the test process would share its imports: verl imported by another test
    module, before the CPU platform's environment, would ask Ray for GPUs). Its output."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train-{time.monotonic_ns()}.json"
    path.write_text(config.dump())
    proc = _psft_train(path)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(base: Path, tiny_model_dir: Path, ray_cluster) -> dict[str, Path]:
    roots = {}
    for name, nodes in (("one", 1), ("ray", 2)):
        root = new_root(base, name)
        job = make_job(tiny_model_dir, base / "train.jsonl", nodes)
        train_as_the_rayjob_does(stage(job, "train", root), base / "configs")
        roots[name] = root
    return roots


def test_workers_ran_on_both_nodes(runs, ray_cluster):
    from ray_cluster import HEAD_RESOURCE, WORKER_RESOURCE

    summary = json.loads((runs["ray"] / "train/summary.json").read_text())
    assert summary["processes"] == 2
    nodes = [w["node_id"] for w in sorted(summary["workers"], key=lambda w: w["rank"])]
    assert sorted(nodes) == sorted(
        [ray_cluster.node_id(HEAD_RESOURCE), ray_cluster.node_id(WORKER_RESOURCE)]
    )


@pytest.mark.parametrize("key", COMPARED)
def test_per_step_values_match_one_process(runs, key):
    one, ray = records(runs["one"]), records(runs["ray"])
    assert [r["step"] for r in one] == [r["step"] for r in ray] == list(range(1, STEPS + 1))
    for a, b in zip(one, ray, strict=True):
        assert b[key] == pytest.approx(a[key], rel=REL_TOL, abs=1e-9), (a["step"], key)


def test_the_baseline_before_training_matches(runs):
    one, ray = all_records(runs["one"])[0], all_records(runs["ray"])[0]
    assert one["step"] == ray["step"] == 0
    for key in ("val_loss", "val_entropy"):
        assert ray[key] == pytest.approx(one[key], rel=REL_TOL)


def test_training_moved_and_validated(runs):
    one, ray = records(runs["one"]), records(runs["ray"])
    assert ray[-1]["nll"] < ray[0]["nll"] - 0.05
    assert ray[-1]["ratio_max"] > 1.02  # the ratio really differs from 1 here
    assert all(r["clip_fraction"] > 0 for r in ray[1:])  # and tokens are clipped
    assert ray[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=REL_TOL)
    assert set(ray[-1]) == set(one[-1])


def test_exported_weights_match(runs):
    import torch
    from safetensors.torch import load_file

    one = load_file(runs["one"] / "train/final/model.safetensors")
    ray = load_file(runs["ray"] / "train/final/model.safetensors")
    assert sorted(one) == sorted(ray)
    for name, tensor in one.items():
        torch.testing.assert_close(ray[name], tensor, rtol=1e-5, atol=1e-7)
    assert (runs["ray"] / "train/final/tokenizer.json").is_file()


def test_checkpoints_are_complete_and_named_by_the_tracker(runs):
    checkpoints = runs["ray"] / "train/verl/checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    meta = json.loads((checkpoints / f"global_step_{STEPS}/psft_checkpoint.json").read_text())
    assert meta["world_size"] == 2
    for rank in (0, 1):
        assert f"model_world_size_2_rank_{rank}.pt" in meta["files"]
    assert all((checkpoints / f"global_step_{STEPS}" / f).is_file() for f in meta["files"])


def test_resuming_with_another_world_size_is_refused(runs, tiny_model_dir, base):
    from psft.trainer import train

    job = make_job(tiny_model_dir, base / "train.jsonl", nodes=1, steps=STEPS + 1)
    with pytest.raises(UserError, match=r"^spec\.resources\.nodes: .*written by 2 training") as e:
        train.run(stage(job, "train", runs["ray"]))
    assert "nodes x gpusPerNode = 2" in str(e.value)


def test_checkpoints_go_to_s3_from_the_workers_and_resume_on_fresh_nodes(
    runs, base, tiny_model_dir, ray_cluster, multinode_s3, monkeypatch, tmp_path
):
    """S3 storage: every worker uploads its own shards; a rerun whose nodes have nothing
    cached (a new PSFT_CACHE_DIR, passed to the workers) resumes from the bucket alone and
    ends with the numbers of the uninterrupted run on local storage."""
    from psft.trainer.storage import open_run_store

    bucket = multinode_s3.create_bucket("multinode")
    storage = multinode_s3.storage_spec(bucket)
    for name, value in multinode_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PSFT_CACHE_DIR", str(tmp_path / "cache-first"))
    root = f"s3://{bucket}/run"
    data = base / "train.jsonl"
    first = stage(
        make_job(tiny_model_dir, data, 2, steps=SAVE_EVERY, storage=storage), "train", root
    )
    store = open_run_store(first)
    for path in sorted((base / "prepared" / "data").rglob("*")):
        if path.is_file():
            key = f"data/{path.relative_to(base / 'prepared' / 'data').as_posix()}"
            store.local_path(key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, store.local_path(key))
            store.push(key)
    train_as_the_rayjob_does(first, tmp_path)

    objects = {
        o.object_name[len("run/") :]
        for o in multinode_s3.client().list_objects(bucket, prefix="run/", recursive=True)
    }
    folder = f"train/verl/checkpoints/global_step_{SAVE_EVERY}"
    for rank in (0, 1):
        for kind in ("model", "optim", "extra_state"):
            assert f"{folder}/{kind}_world_size_2_rank_{rank}.pt" in objects
    for name in ("psft_checkpoint.json", "data_0.pt", "fsdp_config.json"):
        assert f"{folder}/{name}" in objects
    assert "train/verl/checkpoints/latest_checkpointed_iteration.txt" in objects
    assert "train/final/model.safetensors" in objects

    monkeypatch.setenv("PSFT_CACHE_DIR", str(tmp_path / "cache-second"))
    second = stage(make_job(tiny_model_dir, data, 2, storage=storage, keep=1), "train", root)
    out = train_as_the_rayjob_does(second, tmp_path)
    # keepCheckpoints 1: the step-2 checkpoint is gone from the bucket too, not only from
    # the workers' disks
    steps = {
        o.object_name.split("/")[4]
        for o in multinode_s3.client().list_objects(
            bucket, prefix="run/train/verl/checkpoints/", recursive=True
        )
    }
    assert steps == {f"global_step_{STEPS}", "latest_checkpointed_iteration.txt"}, steps
    assert f"removed checkpoints of steps [{SAVE_EVERY}]" in out
    resumed = {r["step"]: r for r in records(open_run_store(second).work_dir)}
    assert f"resumed from the checkpoint of step {SAVE_EVERY}" in out
    for reference in records(runs["ray"])[SAVE_EVERY:]:
        got = resumed[reference["step"]]
        for key in COMPARED:
            assert relative(reference[key], got[key]) <= REL_TOL, (reference["step"], key)


def _psft_train(config: Path) -> subprocess.Popen:
    psft = str(Path(sys.executable).parent / "psft")
    return subprocess.Popen(
        [psft, "train", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def test_a_cluster_too_small_for_the_spec_stops_naming_the_fields(
    base, tiny_model_dir, ray_cluster, monkeypatch
):
    """nodes: 4 on the two-node cluster (one CPU each): Ray would wait for the third group
    forever; the driver stops after the deadline (exit 2) saying what the cluster has."""
    root = new_root(base, "too-many-nodes")
    config = root / "stage.json"
    job = make_job(tiny_model_dir, base / "train.jsonl", nodes=4)
    config.write_text(stage(job, "train", root).dump())
    monkeypatch.setenv("PSFT_RAY_PLACEMENT_TIMEOUT", "4")
    proc = _psft_train(config)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, out[-3000:]
    error = [line for line in out.splitlines() if "spec.resources.nodes: the run" in line]
    assert error, out[-3000:]
    print(error[-1])  # shown with -s: the message a user reads
    assert "the run needs 4 groups of 1 worker (1 CPU each, each group on one node)" in error[-1]
    assert "can hold 2 (" in error[-1] and "lower spec.resources.nodes;" in error[-1]
    assert re.search(r"after [4-9] s ", error[-1]), error[-1]  # the deadline, not 30 s more
    assert not (root / "train" / "metrics.jsonl").exists()  # nothing started


def test_worker_node_lost_then_resumed(runs, base, tiny_model_dir, ray_cluster):
    """Runs last: kills the worker node after the step-2 checkpoint, then restarts it."""
    root = new_root(base, "killed")
    config = root / "stage.json"
    job = make_job(tiny_model_dir, base / "train.jsonl", nodes=2)
    config.write_text(stage(job, "train", root).dump())
    tracker = root / "train/verl/checkpoints/latest_checkpointed_iteration.txt"

    proc = _psft_train(config)
    deadline = time.monotonic() + 240
    while not (tracker.is_file() and tracker.read_text() == str(SAVE_EVERY)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint of step 2"
        time.sleep(0.05)
    ray_cluster.kill_worker_node()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, out[-3000:]
    error = [line for line in out.splitlines() if "multi-node training stopped" in line]
    assert error, out[-3000:]
    print(error[-1])  # shown with -s: the message a user reads
    # Ray reports the dead worker, or its peer reports the broken collective first
    assert re.search(r"a training worker (died|lost its peer)", error[-1]), error[-1]
    assert "resumes from the last complete checkpoint" in error[-1]
    stopped_at = records(root)[-1]["step"]
    assert SAVE_EVERY <= stopped_at < STEPS

    ray_cluster.start_worker()
    proc = _psft_train(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from the checkpoint of step {SAVE_EVERY}" in out
    resumed = records(root)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    # the same numbers as the uninterrupted run of the same spec
    for a, b in zip(records(runs["ray"]), resumed, strict=True):
        for key in COMPARED:
            assert relative(a[key], b[key]) <= REL_TOL, (a["step"], key, a[key], b[key])
        assert (a["epoch"], a["tokens"]) == (b["epoch"], b["tokens"])
    final = json.loads((root / "train/summary.json").read_text())["final"]
    assert final["val_loss"] == pytest.approx(records(runs["ray"])[-1]["val_loss"], rel=REL_TOL)
