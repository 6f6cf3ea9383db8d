"""`psft grpo --config stage.json`: GRPO from the PSFT checkpoint.

Reads the prompt set (every row must have a reference answer: checked before any model
is loaded), starts from layout.final_model("train"), rewards completions with the
evaluation stage's math grader on their last \\boxed{} answer, writes per-step metrics
(reward mean, accuracy, entropy, response length, ...) to grpo/metrics.jsonl and the final
policy to layout.final_model("grpo").

Rollout backends: `trl` / `hf` run TRL's GRPOTrainer with transformers generation (CPU
or one GPU; see trl_backend for why not verl's hf rollout); `vllm` is verl GRPO with a
vLLM rollout on GPUs (verl_backend; the trainer image has vLLM). `auto` picks vllm when
vLLM and a GPU are present, else trl.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from psft.workflows import layout
from psft.workflows.errors import UserError
from psft.workflows.stages import StageConfig

SOURCE_STAGE = "train"


def choose_backend(rollout: str, *, cuda: bool, vllm: bool) -> str:
    if rollout in ("trl", "hf"):
        return "trl"
    if rollout == "vllm":
        if not (cuda and vllm):
            raise UserError(
                "spec.grpo.rollout: 'vllm' needs a CUDA GPU and the vllm package (the "
                "trainer image has both); use 'trl' (or 'auto') on this machine"
            )
        return "vllm"
    return "vllm" if cuda and vllm else "trl"


def _prompt_files(config: StageConfig, store) -> list[tuple[str, Path]]:
    from psft.trainer.storage import fetch_uri

    files = []
    for name in config.job.spec.grpo.prompts:
        path = fetch_uri(name)
        if not path.exists():
            raise UserError(f"spec.grpo.prompts: {name} does not exist")
        files.append((name, path))
    return files


def run(config: StageConfig) -> None:
    import torch

    from psft.trainer.grpo.prompts import load_prompts
    from psft.trainer.model import check_model_folder, resolve_device
    from psft.trainer.storage import open_run_store
    from psft.trainer.telemetry import Telemetry

    job = config.job
    store = open_run_store(config)
    # reference answers first: a prompt set the reward cannot grade fails before any rollout
    rows = load_prompts(job, _prompt_files(config, store))
    backend = choose_backend(
        job.spec.grpo.rollout,
        cuda=torch.cuda.is_available(),
        vllm=importlib.util.find_spec("vllm") is not None,
    )
    device = resolve_device(job.spec.resources.device)
    source_key = layout.final_model(SOURCE_STAGE)
    if not store.exists(source_key):
        raise UserError(
            f"{source_key}: no PSFT model to start GRPO from; run the train stage first"
        )
    model_dir = store.pull(source_key)
    check_model_folder(
        model_dir, f"the PSFT model {source_key}", "run the train stage again to write it"
    )
    stage = config.stage
    out_key = layout.final_model(stage)
    out_dir = store.local_path(out_key)
    work_dir = store.work_dir / stage / "trl"
    metrics_path = store.local_path(layout.metrics(stage))

    with Telemetry(config, metrics_path) as telemetry:
        telemetry.rewind(0)  # GRPO restarts from the PSFT model: drop an earlier attempt
        if backend == "vllm":
            from psft.trainer.grpo import verl_backend

            records = verl_backend.train(job, rows, model_dir, out_dir, store.work_dir / stage)
            for record in records:
                telemetry.log(record)
            steps = len(records)
        else:
            from psft.trainer.grpo import trl_backend

            steps = trl_backend.train(
                job, rows, model_dir, out_dir, work_dir, device, log=telemetry.log
            )
    store.push(out_key)
    summary = {"backend": backend, "steps": steps, "prompts": len(rows), "source": source_key}
    summary_path = store.local_path(layout.stage_summary(stage))
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    store.push(layout.stage_summary(stage))
