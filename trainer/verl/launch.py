"""`psft train` with engine verl: PSFTJob -> verl config -> torchrun on this node.

The stage process resolves inputs (model, prepared data), writes the checked verl config
into the stage's work folder and starts `psft.trainer.verl.worker` under torchrun, one
process per GPU (one on CPU). Rank 0 writes `train/metrics.jsonl` with the native engine's
keys; the final policy is exported to Hugging Face format at layout.final_model(stage).
On several nodes the operator runs the same worker as a Ray job.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from psft.workflows import layout
from psft.workflows.errors import UserError
from psft.workflows.stages import StageConfig

CPU_PLUGIN = "psft.trainer.verl.platform_cpu"


def prepare_environment(platform: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment verl needs before it is imported (its plugin hook reads it at import)."""
    env = os.environ if env is None else env
    env.setdefault("VERL_USE_EXTERNAL_PLUGINS", "none")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "disabled")
    if platform == "cpu":
        modules = [m for m in env.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
        if CPU_PLUGIN not in modules:
            modules.append(CPU_PLUGIN)
        env["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)
        env["VERL_PLATFORM"] = "cpu"
    return env  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device(config: StageConfig) -> str:
    from psft.trainer.model import resolve_device

    return resolve_device(config.job.spec.resources.device)


def _nproc(config: StageConfig, device: str) -> int:
    nodes = config.job.spec.resources.nodes
    if nodes > 1:
        raise UserError(
            f"spec.resources.nodes: {nodes} nodes; this launcher runs verl on one node "
            "(torchrun). Several nodes need a Ray cluster (KubeRay RayJob)"
        )
    if device == "cpu":
        return 1
    import torch

    wanted = config.job.spec.resources.gpus_per_node
    available = torch.cuda.device_count()
    if wanted > available:
        raise UserError(
            f"spec.resources.gpusPerNode: {wanted} GPUs asked for, {available} visible here"
        )
    return max(wanted, 1)


def torchrun_argv(nproc: int, port: int, worker_args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "psft.trainer.verl.worker",
        *worker_args,
    ]


def run(config: StageConfig) -> None:
    """Entry point for `psft train` when the engine is verl."""
    from psft.trainer.storage import open_run_store
    from psft.trainer.verl.config import VerlInputs, build_config, save_config
    from psft.trainer.verl.data import verl_rows

    device = _device(config)
    if device == "cpu":
        from psft.trainer.verl.platform_cpu import use_in_this_process

        use_in_this_process()  # the config checks below import verl here too
    stage = config.stage
    store = open_run_store(config)
    work = store.work_dir / stage / "verl"
    work.mkdir(parents=True, exist_ok=True)

    train_rows = verl_rows(store.pull(layout.DATA_TRAIN), work / "train.parquet")
    val_files = None
    if store.exists(layout.DATA_VALIDATION):
        val = verl_rows(store.pull(layout.DATA_VALIDATION), work / "validation.parquet")
        val_files = [str(val)] if val is not None else None
    if train_rows is None:
        raise UserError(f"{layout.DATA_TRAIN}: no training rows after preparation")

    # verl's resumable checkpoints (sharded model, optimizer, data position) live in the
    # run's storage too, so a restarted pod resumes where the last one stopped
    checkpoints_key = f"{stage}/verl/checkpoints"
    if store.exists(checkpoints_key):
        store.pull(checkpoints_key)

    nproc = _nproc(config, device)
    inputs = VerlInputs(
        model_path=str(_model_path(config)),
        train_files=[str(train_rows)],
        val_files=val_files,
        checkpoint_dir=str(store.local_path(checkpoints_key)),
        device=device,
        nproc_per_node=nproc,
    )
    verl_config = build_config(config.job, inputs)
    config_path = work / "verl.yaml"
    save_config(verl_config, config_path)
    stage_json = work / "stage.json"
    stage_json.write_text(config.dump())

    final_key = layout.final_model(stage)
    final_dir = store.local_path(final_key)
    metrics = store.local_path(layout.metrics(stage))
    argv = torchrun_argv(
        nproc,
        _free_port(),
        [
            "--stage-config",
            str(stage_json),
            "--verl-config",
            str(config_path),
            "--final-dir",
            str(final_dir),
            "--metrics",
            str(metrics),
            "--checkpoints-key",
            checkpoints_key,
        ],
    )
    env = prepare_environment(device, dict(os.environ))
    started = time.monotonic()
    result = subprocess.run(argv, env=env, check=False)
    if result.returncode != 0:
        raise UserError(
            f"verl training failed (exit {result.returncode}); its log is above. "
            f"verl config: {config_path}"
        )
    store.push(final_key)
    write_summary(config, store, device, nproc, time.monotonic() - started)


def write_summary(config: StageConfig, store, device: str, nproc: int, wall_s: float) -> dict:
    """train/summary.json, with the native engine's keys where they apply."""
    stage = config.stage
    lines = store.local_path(layout.metrics(stage)).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    last = records[-1] if records else {}
    summary = {
        "stage": stage,
        "engine": "verl",
        "objective": config.job.spec.psft.objective,
        "model": config.job.spec.model.source,
        "device": device,
        "processes": nproc,
        "steps": last.get("step", 0),
        "total_steps": last.get("total_steps", 0),
        "tokens": last.get("tokens", 0),
        "wall_time_s": round(wall_s, 3),
        "final": {k: v for k, v in last.items() if isinstance(v, int | float)},
        "final_model": layout.final_model(stage),
    }
    path = store.local_path(layout.stage_summary(stage))
    path.write_text(json.dumps(summary, indent=2) + "\n")
    store.push(layout.stage_summary(stage))
    print(
        f"train ({summary['objective']}, verl): {summary['steps']} steps, "
        f"{summary['tokens']} response tokens, {wall_s:.1f} s",
        flush=True,
    )
    return summary


def _model_path(config: StageConfig) -> Path:
    from psft.trainer.model import resolve_model

    source = config.job.spec.model.source
    if source.startswith("s3://"):
        from psft.trainer.storage import fetch_uri

        return fetch_uri(source)
    return resolve_model(source)
