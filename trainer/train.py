"""The train stage: `psft train --config stage.json`.

Runs the PSFT (or SFT) objective on the prepared data with the native engine and writes
train/metrics.jsonl, resumable checkpoints, train/final (Hugging Face, safetensors) and
train/summary.json into the run's storage. A restarted stage resumes from the newest
committed checkpoint.
"""

from __future__ import annotations

from psft.workflows import layout
from psft.workflows.errors import UserError
from psft.workflows.stages import StageConfig


def select_engine(config: StageConfig) -> str:
    """`native` or `verl`: psft.engine resolved (see PSFTJobSpec.engine)."""
    return config.job.spec.engine


def run(config: StageConfig) -> None:
    from psft.trainer.storage import open_run_store

    store = open_run_store(config)
    engine = select_engine(config)
    if engine == "verl":
        try:
            from psft.trainer.verl import launch
        except ImportError as exc:
            raise UserError(
                f"psft.engine resolved to verl but it cannot be imported ({exc}); install the "
                "`verl` extra or set psft.engine: native"
            ) from exc
        launch.run(config)
        return

    from psft.trainer.engine.loop import train

    summary = train(config, store)
    assert summary is not None
    final = summary["final"]
    parts = [f"{summary['steps']} steps", f"{summary['tokens']} response tokens"]
    parts.append(f"{summary['wall_time_s']:.1f} s")
    if "val_loss" in final:
        parts.append(f"val_loss {final['val_loss']:.4f}")
    print(f"train ({summary['objective']}): " + ", ".join(parts))
    print(f"final model: {store.root}/{layout.final_model(config.stage)}")
    print(f"metrics:     {store.root}/{layout.metrics(config.stage)}", flush=True)
