"""PSFT step time: the verl engine (FSDP2 through verl, CPU platform plugin) vs the native one.

The same job (model, prepared rows, batches, seed, objective) runs through both engines
one after the other; prints the median step time and tokens/s of each (step 1 excluded:
warm-up) plus the wall time including start-up, and the ratio verl / native.

    .venv/bin/python benchmarks/verl_vs_native.py                 # SmolLM2-135M on CPU
    .venv/bin/python benchmarks/verl_vs_native.py --model tiny    # tiny random Llama
    .venv/bin/python benchmarks/verl_vs_native.py --device cuda --dtype bfloat16

Nothing is downloaded: the default model is the registered `smollm2-135m-instruct`;
data are the quickstart's demonstrations (examples/data/math_train.jsonl).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "math_train.jsonl"


def make_job(args: argparse.Namespace, model: str, engine: str):
    from psft.workflows.spec import PSFTJob

    return PSFTJob.model_validate(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "model": {"source": model, "dtype": args.dtype},
                "dataset": {
                    "train": [str(DATA)],
                    "maxPromptLength": 256,
                    "maxResponseLength": args.max_response_length,
                    "truncation": "right",
                },
                "psft": {
                    "engine": engine,
                    "batchSize": args.batch_size,
                    "miniBatchSize": args.mini_batch_size,
                    "microBatchSize": args.micro_batch_size,
                    "maxSteps": args.steps,
                    "learningRate": 1e-5,
                    "warmupSteps": 0,
                },
                "resources": {"device": args.device},
                "monitoring": {"enabled": False},
                "eval": {"enabled": False},
            },
        }
    )


def run_engine(args, model: str, engine: str, root: Path, prepared: Path | None) -> dict:
    from psft.trainer import prepare, train
    from psft.workflows.stages import StageConfig

    job = make_job(args, model, engine)

    def config(kind: str) -> StageConfig:
        return StageConfig(stage=kind, kind=kind, job=job, run_root=str(root), progress=False)

    if prepared is None:
        prepare.run(config("prepare"))
    else:
        shutil.copytree(prepared, root / "data")
    started = time.perf_counter()
    train.run(config("train"))
    wall = time.perf_counter() - started
    lines = (root / "train" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    timed = records[1:] or records
    return {
        "step_s": statistics.median(r["step_seconds"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_second"] for r in timed),
        "wall_s": wall,
        "loss": [round(r["loss"], 6) for r in records],
        "entropy": [round(r["entropy"], 6) for r in records],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="or 'tiny'")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--max-response-length", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="psft-bench-") as tmp:
        base = Path(tmp)
        model = args.model
        if model == "tiny":
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_model import make_tiny_model

            model = str(make_tiny_model(base / "tiny"))
        results = {}
        prepared = None
        for engine in ("native", "verl"):
            results[engine] = run_engine(args, model, engine, base / engine, prepared)
            prepared = base / engine / "data"

    print(
        f"\nmodel {args.model}, device {args.device}, {args.steps} steps of batch "
        f"{args.batch_size} (mini {args.mini_batch_size}, micro {args.micro_batch_size})"
    )
    for engine, r in results.items():
        print(
            f"{engine:7} step {r['step_s']:.3f} s (median, step 1 excluded)  "
            f"{r['tokens_per_s']:.0f} tokens/s  wall {r['wall_s']:.1f} s incl. start-up"
        )
        print(f"        loss {r['loss']}\n        entropy {r['entropy']}")
    n, v = results["native"], results["verl"]
    print(
        f"ratio verl/native: step time {v['step_s'] / n['step_s']:.2f}x, "
        f"wall {v['wall_s'] / n['wall_s']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
