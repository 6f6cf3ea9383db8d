"""One training process of a verl PSFT run (started by `launch` through torchrun).

    python -m torch.distributed.run ... -m psft.trainer.verl.worker \\
        --stage-config stage.json --verl-config verl.yaml --final-dir <run>/train/final
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="psft-verl-worker")
    p.add_argument("--stage-config", required=True)
    p.add_argument("--verl-config", required=True)
    p.add_argument("--final-dir", required=True)
    p.add_argument("--metrics", required=True, help="metrics.jsonl written by rank 0")
    p.add_argument("--checkpoints-key", required=True, help="run-store key of verl's checkpoints")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from psft.trainer.verl.launch import prepare_environment

    prepare_environment(os.environ.get("VERL_PLATFORM") or "cuda")
    import verl  # noqa: F401  (loads VERL_USE_EXTERNAL_MODULES)

    from psft.trainer.verl.compat import skip_trl_value_head_patch

    skip_trl_value_head_patch()
    config = OmegaConf.load(args.verl_config)
    if config.trainer.device == "cpu":
        from psft.trainer.verl import platform_cpu

        platform_cpu.install()
        platform_cpu.init_process_group()
    else:
        from verl.utils.distributed import initialize_global_process_group

        initialize_global_process_group()

    from verl.utils.device import auto_set_device

    from psft.trainer.verl.checkpoints import prune_store_or_warn
    from psft.trainer.verl.psft_trainer import PSFTTrainer, export_hf_model

    auto_set_device(config)
    rank = dist.get_rank()
    telemetry = store = None
    if rank == 0:
        from psft.trainer.storage import open_run_store
        from psft.trainer.telemetry import Telemetry
        from psft.workflows.stages import read_stage_config

        stage_config = read_stage_config(args.stage_config)
        store = open_run_store(stage_config)
        telemetry = Telemetry(stage_config, Path(args.metrics), store=store)
        telemetry.open()

    def publish_checkpoint(step: int, _folder: str) -> None:
        dist.barrier()  # every rank has written its shard
        if store is not None:
            store.push(args.checkpoints_key)
            keep = config.trainer.max_ckpt_to_keep
            prune_store_or_warn(store, args.checkpoints_key, step, keep)

    def on_step(record: dict) -> None:
        from psft.trainer.verl.launch import progress_line

        assert telemetry is not None
        telemetry.log(record)
        print(progress_line(record), flush=True)

    try:
        trainer = PSFTTrainer(
            config,
            on_step=on_step if telemetry else None,
            on_checkpoint=publish_checkpoint,
        )
        if telemetry is not None:  # from 0 too: a retried attempt logged steps already
            telemetry.rewind(trainer.resume_global_step)
        if trainer.resume_global_step and telemetry is not None:
            from psft.trainer.verl.launch import tokens_until

            trainer.tokens_before = tokens_until(Path(args.metrics), trainer.resume_global_step)
        trainer.fit()
        export_hf_model(trainer, str(config.model.path), args.final_dir)
    finally:
        if telemetry is not None:
            telemetry.close()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
