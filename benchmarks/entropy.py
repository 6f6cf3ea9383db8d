"""Entropy and held-out NLL per step: PSFT vs SFT on the same model, data and seed.

The paper's claim (arXiv 2508.17784): SFT's token entropy collapses as it fits the
demonstrations, PSFT's stays near its start, at comparable held-out loss. Both runs use
the real prepare stage and the native engine's Trainer (no checkpoints are written).

    .venv/bin/python benchmarks/entropy.py                       # SmolLM2-135M, CPU, short
    .venv/bin/python benchmarks/entropy.py --steps 40 --batch-size 16 --mini-batch-size 4 \\
        --device cuda                                            # a real comparison on a GPU

Prints a table per step (training entropy, held-out NLL and entropy of both objectives),
writes entropy.png and entropy.json into --out. Data: examples/data/math_train.jsonl
(MATH-500 worked solutions shipped in the repository); the validation rows are a seeded
held-out fraction of it, never trained on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "math_train.jsonl"


def stage_config(args: argparse.Namespace, model: str, objective: str, root: Path):
    from psft.workflows.spec import PSFTJob
    from psft.workflows.stages import StageConfig

    n_rows = args.train_rows + args.val_rows
    job = PSFTJob.model_validate(
        {
            "metadata": {"name": f"entropy-{objective}"},
            "spec": {
                "model": {"source": model, "dtype": args.dtype},
                "dataset": {
                    "train": [str(DATA)],
                    "maxPromptLength": args.max_prompt_length,
                    "maxResponseLength": args.max_response_length,
                    "truncation": "error",
                    "onBadRow": "skip",
                    "limit": n_rows,
                    "validation": {"fraction": args.val_rows / n_rows},
                },
                "psft": {
                    "objective": objective,
                    "batchSize": args.batch_size,
                    "miniBatchSize": args.mini_batch_size,
                    "microBatchSize": args.micro_batch_size,
                    "maxSteps": args.steps,
                    "learningRate": args.lr,
                    "warmupSteps": args.warmup,
                    "seed": args.seed,
                },
                "resources": {"device": args.device},
                "monitoring": {"enabled": False},
            },
        }
    )
    return StageConfig(stage="train", kind="train", job=job, run_root=str(root), progress=False)


def run_objective(args, model: str, objective: str, root: Path, prepared: Path | None):
    from psft.trainer.engine.loop import Trainer
    from psft.trainer.prepare import prepare
    from psft.trainer.storage import LocalRunStore

    config = stage_config(args, model, objective, root)
    store = LocalRunStore(root)
    if prepared is None:
        stats = prepare(config, store)
        print(
            f"data: {stats['train']['rows']} train / {stats['validation']['rows']} held-out rows "
            f"({stats['train']['skipped']} longer than the limits skipped), response tokens "
            f"p50 {stats['train']['response_tokens']['p50']:.0f}"
        )
    else:
        shutil.copytree(prepared, root / "data")
    trainer = Trainer(config, store)
    records: list[dict[str, Any]] = [{"step": 0, **trainer.validate()}]
    print(f"{objective}: step 0 val_loss {records[0]['val_loss']:.4f}", flush=True)
    started = time.monotonic()
    while trainer.state.step < trainer.total_steps:
        record = trainer.run_step()
        if record["step"] % args.eval_every == 0 or record["step"] == trainer.total_steps:
            record.update(trainer.validate())
        records.append(record)
        val = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        print(
            f"{objective}: step {record['step']}/{trainer.total_steps} entropy "
            f"{record['entropy']:.4f} nll {record['nll']:.4f} clip "
            f"{record['clip_fraction']:.3f}{val} ({record['step_seconds']:.1f} s)",
            flush=True,
        )
    return records, time.monotonic() - started


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        ("entropy", "training entropy (response tokens)"),
        ("val_entropy", "held-out entropy"),
        ("val_loss", "held-out NLL"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for objective, recs in results.items():
            pts = [(r["step"], r[key]) for r in recs if key in r]
            ax.plot(*zip(*pts, strict=True), marker="o", label=objective.upper())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--train-rows", type=int, default=48)
    parser.add_argument("--val-rows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mini-batch-size", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--max-response-length", type=int, default=160)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "entropy")
    args = parser.parse_args()

    from psft.trainer.model import resolve_model

    model = str(resolve_model(args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = None
        for objective in ("psft", "sft"):
            root = Path(tmp) / objective
            results[objective], seconds[objective] = run_objective(
                args, model, objective, root, prepared
            )
            prepared = root / "data"

    print()
    print(
        f"{'step':>4} | {'PSFT entropy':>12} {'SFT entropy':>12} | {'PSFT val NLL':>12} "
        f"{'SFT val NLL':>12} | {'PSFT val ent':>12} {'SFT val ent':>12}"
    )

    def cell(rec: dict | None, key: str) -> str:
        return f"{rec[key]:>12.4f}" if rec and key in rec else f"{'':>12}"

    for p, s in zip(results["psft"], results["sft"], strict=True):
        print(
            f"{p['step']:>4} | {cell(p, 'entropy')} {cell(s, 'entropy')} | "
            f"{cell(p, 'val_loss')} {cell(s, 'val_loss')} | "
            f"{cell(p, 'val_entropy')} {cell(s, 'val_entropy')}"
        )
    for objective, recs in results.items():
        first, last = recs[1]["entropy"], recs[-1]["entropy"]
        v0, v1 = recs[0]["val_loss"], recs[-1]["val_loss"]
        e0, e1 = recs[0]["val_entropy"], recs[-1]["val_entropy"]
        print(
            f"{objective.upper()}: training entropy {first:.4f} -> {last:.4f} "
            f"({(last - first) / first:+.1%}), held-out entropy {e0:.4f} -> {e1:.4f} "
            f"({(e1 - e0) / e0:+.1%}), held-out NLL {v0:.4f} -> {v1:.4f}; "
            f"{seconds[objective]:.0f} s"
        )
    plot(results, args.out / "entropy.png")
    (args.out / "entropy.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1)
    )
    print(f"wrote {args.out / 'entropy.png'} and {args.out / 'entropy.json'}")


if __name__ == "__main__":
    sys.exit(main())
