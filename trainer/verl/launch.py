"""`psft train` with engine verl: PSFTJob -> verl config -> torchrun on this node.

The stage process resolves inputs (model, prepared data), writes the checked verl config
into the stage's work folder and starts `psft.trainer.verl.worker` under torchrun, one
process per GPU (one on CPU). Rank 0 writes `train/metrics.jsonl` with the native engine's
keys; the final policy is exported to Hugging Face format at layout.final_model(stage).
On several nodes (`resources.nodes > 1`) the same stage process is the driver of a Ray job
(the RayJob's entrypoint, psft.workflows.argo_ray): it connects to the Ray cluster and runs
psft.trainer.verl.ray_trainer, one worker per GPU of every node, writing metrics.jsonl,
the progress file and the Prometheus gauges itself.
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
    """Training processes per node: one per GPU, one on CPU."""
    if device == "cpu":
        return 1
    if config.job.spec.resources.nodes > 1:
        # the driver runs on the head node; Ray places the workers on every node's GPUs
        return max(config.job.spec.resources.gpus_per_node, 1)
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


def run(config: StageConfig, *, on_ray: bool | None = None) -> None:
    """Entry point for `psft train` when the engine is verl: torchrun on this node, or the
    driver of a Ray job when `resources.nodes > 1` (`on_ray` forces either; the benchmark
    runs one Ray worker that way)."""
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
    # run's storage too, so a restarted pod resumes where the last one stopped (on Ray each
    # worker fetches its own shards)
    checkpoints_key = f"{stage}/verl/checkpoints"
    multi_node = config.job.spec.resources.nodes > 1 if on_ray is None else on_ray
    nproc = _nproc(config, device)
    if not multi_node and store.exists(checkpoints_key):
        store.pull(checkpoints_key)
        check_resumable(config, store.local_path(checkpoints_key), nproc, checkpoints_key)
    inputs = VerlInputs(
        model_path=str(_model_path(config)),
        train_files=[str(train_rows)],
        val_files=val_files,
        checkpoint_dir=str(store.local_path(checkpoints_key)),
        device=device,
        nproc_per_node=nproc,
    )
    verl_config = build_config(config.trained_job(), inputs)
    config_path = work / "verl.yaml"
    save_config(verl_config, config_path)
    stage_json = work / "stage.json"
    stage_json.write_text(config.dump())

    final_key = layout.final_model(stage)
    final_dir = store.local_path(final_key)
    metrics = store.local_path(layout.metrics(stage))
    if multi_node:
        started = time.monotonic()
        workers = run_on_ray(
            config, store, verl_config, device, checkpoints_key, final_key, metrics
        )
        nodes = config.job.spec.resources.nodes
        wall = time.monotonic() - started
        write_summary(config, store, device, nproc * nodes, wall, workers=workers)
        return
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


def check_resumable(config: StageConfig, checkpoint_dir: Path, world: int, key: str) -> None:
    """Refuse to resume a checkpoint written by another number of processes."""
    from psft.trainer.verl import checkpoints as ckpt

    step = ckpt.read_tracker(checkpoint_dir)
    if step is None:
        return
    folder = checkpoint_dir / ckpt.step_folder(step)
    res = config.job.spec.resources
    ckpt.check_world_size(
        ckpt.world_size_of(folder),
        step,
        world,
        res.nodes,
        world // max(res.nodes, 1),
        f"{key}/{ckpt.step_folder(step)}",
    )


SHARED_ENV = ("PSFT_CACHE_DIR", "PSFT_CACHE")
"""Set on the driver, passed to every Ray worker: the run's local mirror and the model
cache must be the same paths on every node (verl loads checkpoints by the driver's path)."""


def worker_env(device: str) -> dict[str, str]:
    """What every Ray worker needs in its environment before it imports verl."""
    env = prepare_environment(device, {})
    if device == "cpu":
        env["VERL_USE_EXTERNAL_MODULES"] = CPU_PLUGIN
    env.update({name: os.environ[name] for name in SHARED_ENV if os.environ.get(name)})
    return env


def connect_ray() -> bool:
    """Join the Ray cluster of this job (RAY_ADDRESS, set in a RayJob's driver, else the
    cluster this node belongs to). True when this call connected (and must disconnect)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except ConnectionError as exc:
        raise UserError(
            f"spec.resources.nodes: more than one node needs a Ray cluster, and there is "
            f"none to join at {address!r} ({exc}); multi-node training runs as a KubeRay "
            "RayJob on Kubernetes, or set RAY_ADDRESS to a running Ray cluster"
        ) from exc
    return True


def run_on_ray(
    config: StageConfig,
    store,
    verl_config,
    device: str,
    checkpoints_key: str,
    final_key: str,
    metrics: Path,
) -> list[dict]:
    """The driver of a multi-node run (psft.trainer.verl.ray_trainer); returns where each
    worker ran (rank, Ray node id)."""
    import ray

    from psft.trainer.telemetry import Telemetry
    from psft.trainer.verl.compat import skip_trl_value_head_patch
    from psft.trainer.verl.placement import Shape, place

    skip_trl_value_head_patch()
    connected = connect_ray()
    telemetry = None
    try:
        shape = Shape(
            nodes=int(verl_config.trainer.nnodes),
            per_node=int(verl_config.trainer.n_gpus_per_node),
            gpu=device != "cpu",
        )
        groups, waited = place(shape)
        if waited > 1:
            print(f"the Ray cluster placed {shape.describe()} after {waited:.0f} s", flush=True)
        telemetry = Telemetry(config, metrics, store=store)
        telemetry.open()

        def on_step(record: dict) -> None:
            telemetry.log(record)
            print(progress_line(record), flush=True)

        from psft.trainer.verl.ray_trainer import RayPSFTTrainer, WorkerLost

        try:
            trainer = RayPSFTTrainer(
                verl_config,
                stage_config=config.dump(),
                store=store,
                checkpoints_key=checkpoints_key,
                on_step=on_step,
                worker_env=worker_env(device),
                placement_groups=groups,
            )
            telemetry.rewind(trainer.resume_global_step)  # from 0 too: a retried attempt
            if trainer.resume_global_step:
                trainer.tokens_before = tokens_until(metrics, trainer.resume_global_step)
                print(f"resumed from the checkpoint of step {trainer.resume_global_step}")
            trainer.fit()
            trainer.export(final_key)
            return trainer.placements
        except WorkerLost as exc:
            raise WorkerLost(
                f"multi-node training stopped: {exc}. Run the stage again (a new RayJob "
                "attempt does): it resumes from the last complete checkpoint in "
                f"{store.root}/{checkpoints_key}"
            ) from exc
    finally:
        if telemetry is not None:
            telemetry.close()
        if connected:
            ray.shutdown()


def progress_line(record: dict) -> str:
    """The log line of a step record (step 0: the baseline before training)."""
    from psft.trainer.engine.progress import step_line

    if record["step"] == 0:
        return (
            f"step 0 (before training): held-out NLL {record['val_loss']:.4f}, "
            f"entropy {record['val_entropy']:.4f}"
        )
    return step_line(record, None)


def tokens_until(metrics: Path, step: int) -> int:
    """Response tokens trained up to `step`, from its record in metrics.jsonl (0 if none)."""
    if not metrics.is_file():
        return 0
    for line in reversed(metrics.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") == step:
            return int(record.get("tokens") or 0)
    return 0


def write_summary(
    config: StageConfig, store, device: str, nproc: int, wall_s: float, workers: list | None = None
) -> dict:
    """train/summary.json, with the native engine's keys where they apply."""
    stage = config.stage
    lines = store.local_path(layout.metrics(stage)).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    last = records[-1] if records else {}
    summary = {
        "stage": stage,
        "engine": "verl",
        "objective": config.psft_spec().objective,
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
    if workers:
        summary["workers"] = workers
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
