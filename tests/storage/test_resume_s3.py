"""Resume from S3 after `kill -9`: a local training with S3 storage on the tiny model is
killed after a checkpoint; a rerun on an empty work folder (a new pod) resumes from the
checkpoint in the bucket, and its loss curve matches an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers.jobs import make_job, make_stage_config
from servers.seaweed import SeaweedS3

from psft.trainer.prepare import run as run_prepare
from psft.trainer.train import run as run_train
from psft.workflows import layout

pytestmark = pytest.mark.integration

ROWS = [
    {
        "prompt": [{"role": "user", "content": f"What is {i} + 3?"}],
        "demonstration": f"We add: {i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}.",
    }
    for i in range(16)
]
PSFT = {
    "batchSize": 2,
    "miniBatchSize": 1,
    "microBatchSize": 1,
    "learningRate": 3e-3,
    "warmupSteps": 1,
    "maxSteps": 8,
    "saveEvery": 2,
    "keepCheckpoints": 2,
}
COMPARED = ("loss", "entropy", "grad_norm", "ratio_mean", "clip_fraction", "learning_rate")


def read_object(server: SeaweedS3, bucket: str, name: str) -> bytes | None:
    from minio.error import S3Error

    try:
        resp = server.client().get_object(bucket, name)
    except S3Error:
        return None
    try:
        return resp.read()
    finally:
        resp.close()
        resp.release_conn()


def jsonl_steps(body: bytes | None) -> list[int]:
    steps = []
    for line in (body or b"").decode().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            steps.append(json.loads(line)["step"])
    return steps


@pytest.fixture
def s3_job(seaweed: SeaweedS3, bucket: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    env = {**seaweed.env(), "PSFT_CACHE_DIR": str(tmp_path / "cache")}
    env["PSFT_METRICS_ADDR"] = "127.0.0.1"
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def make(name: str):
        job = make_job(
            name,
            storage=seaweed.storage_spec(bucket),
            model={"source": str(tiny_model_dir)},
            # token budgets within the tiny model's context: the stage config is validated
            dataset={
                "train": [str(data)],
                "systemPrompt": "",
                "shuffle": True,
                "maxPromptLength": 512,
                "maxResponseLength": 1024,
            },
            psft=PSFT,
            resources={"device": "cpu"},
            monitoring={"metricsPort": 0},
        )
        run_prepare(make_stage_config(job, "prepare", work_dir=str(tmp_path / name / "prep")))
        return job

    return make


def train_argv(job, tmp_path: Path, pod: str) -> list[str]:
    config = make_stage_config(job, "train", work_dir=str(tmp_path / job.metadata.name / pod))
    config = config.model_copy(update={"progress": False})
    path = tmp_path / job.metadata.name / f"{pod}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.dump())
    return [sys.executable, "-m", "psft.workflows.cli", "train", "--config", str(path)]


def test_kill_9_then_resume_from_s3_matches_an_uninterrupted_run(
    s3_job, seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    straight_job = s3_job("straight")  # uninterrupted, in this process (same code path)
    straight_config = make_stage_config(
        straight_job, "train", work_dir=str(tmp_path / "straight" / "pod-0")
    )
    run_train(straight_config.model_copy(update={"progress": False}))

    job = s3_job("killed")
    root = f"psft/default/killed/local/{layout.checkpoints('train')}"
    log = (tmp_path / "killed-pod-0.log").open("w")
    proc = subprocess.Popen(train_argv(job, tmp_path, "pod-0"), stdout=log, stderr=log)
    killed_at = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        marker = read_object(seaweed, bucket, f"{root}/latest")
        if marker is not None:
            step = json.loads(marker)["step"]
            # kill once the checkpoint and its metrics record are in the bucket
            published = jsonl_steps(
                read_object(seaweed, bucket, f"psft/default/killed/local/{layout.metrics('train')}")
            )
            if step in published:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed-pod-0.log").read_text()[-3000:]
    assert killed_at is not None and killed_at < PSFT["maxSteps"]
    assert read_object(seaweed, bucket, "psft/default/killed/local/train/final/config.json") is None

    # a new pod: empty work folder, everything comes from the bucket
    rerun = subprocess.run(train_argv(job, tmp_path, "pod-1"), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming train from checkpoint step" in rerun.stdout + rerun.stderr

    def curve(name: str) -> list[dict]:
        body = read_object(seaweed, bucket, f"psft/default/{name}/local/{layout.metrics('train')}")
        return [json.loads(line) for line in (body or b"").decode().splitlines()]

    straight, resumed = curve("straight"), curve("killed")
    assert [r["step"] for r in straight] == list(range(1, 9))
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed, strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # steps up to the checkpoint come from the killed attempt, the rest from the rerun
    first_rerun = min(r["time"] for r in resumed if r["step"] > killed_at)
    assert all(r["time"] < first_rerun for r in resumed if r["step"] <= killed_at)
    assert read_object(seaweed, bucket, "psft/default/killed/local/train/final/config.json")
