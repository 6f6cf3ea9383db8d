"""Multi-node PSFT step time: verl's Ray trainer with 1 and 2 workers, and one-node verl.

The same job (model, prepared rows, global batch, seed) runs three times:
- `one-node verl`: the torchrun launcher, one process (psft.trainer.verl.launch);
- `ray x1`: the Ray driver with one worker;
- `ray x2`: the Ray driver with two workers on two Ray nodes (data parallel, gloo on CPU),
  each worker getting half of every mini-batch.
Prints the median step time of each (step 1 excluded: warm-up), the ratio 2 workers / 1
worker (on a 2-CPU machine this is overhead, not speed-up: both workers share the CPUs,
and every update waits for the gradient reduction), the ratio verl-on-Ray / one-node verl
(the single controller's cost: dispatching each batch through Ray's object store, the
old-log-prob round trip, one extra call for the learning rate), and the gradient volume
reduced per step: parameters x 4 bytes (fp32 reduction) x updates per step, and what a
worker sends for it in a ring all-reduce, 2(W-1)/W of that.

    .venv/bin/python benchmarks/multinode.py                  # tiny random Llama, 2 CPUs
    .venv/bin/python benchmarks/multinode.py --hidden 256 --layers 4   # ~3 M parameters
    .venv/bin/python benchmarks/multinode.py --model smollm2-135m-instruct --steps 4

Without RAY_ADDRESS it starts a two-node Ray cluster on this machine
(tests/multinode/ray_cluster.py) and stops it at the end. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "math_train.jsonl"


def make_job(args: argparse.Namespace, model: str, nodes: int):
    from psft.workflows.spec import PSFTJob

    return PSFTJob.model_validate(
        {
            "metadata": {"name": "bench-multinode"},
            "spec": {
                "model": {"source": model},
                "dataset": {
                    "train": [str(DATA)],
                    "maxPromptLength": 256,
                    "maxResponseLength": args.max_response_length,
                    "truncation": "right",
                },
                "psft": {
                    "engine": "verl",
                    "batchSize": args.batch_size,
                    "miniBatchSize": args.mini_batch_size,
                    "microBatchSize": args.micro_batch_size,
                    "maxSteps": args.steps,
                    "learningRate": 1e-5,
                    "warmupSteps": 0,
                },
                "resources": {"device": "cpu", "nodes": nodes},
                "monitoring": {"enabled": False},
                "eval": {"enabled": False},
            },
        }
    )


def stage(job, kind: str, root: Path):
    from psft.workflows.stages import StageConfig

    return StageConfig(stage=kind, kind=kind, job=job, run_root=str(root), progress=False)


def step_times(root: Path) -> list[float]:
    lines = (root / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step_seconds"] for line in lines if line.strip()]


def parameters(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or a registered/local model")
    parser.add_argument("--hidden", type=int, default=32, help="tiny model: hidden size")
    parser.add_argument("--layers", type=int, default=2, help="tiny model: layers")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--max-response-length", type=int, default=256)
    args = parser.parse_args(argv)

    # Ray gives each worker OMP_NUM_THREADS = its CPUs (1 here); the one-node process gets
    # the same, so that all three runs compute with one thread per process
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from psft.trainer import prepare
    from psft.trainer.model import resolve_model
    from psft.trainer.verl import launch

    base = Path(tempfile.mkdtemp(prefix="psft-bench-multinode-"))
    cluster = None
    try:
        sys.path.insert(0, str(REPO / "tests"))
        if args.model == "tiny":
            from tiny_model import make_tiny_model

            model = str(make_tiny_model(base / "tiny", hidden=args.hidden, layers=args.layers))
        else:
            model = str(resolve_model(args.model))
        if not os.environ.get("RAY_ADDRESS"):
            sys.path.insert(0, str(REPO / "tests" / "multinode"))
            from ray_cluster import LocalRayCluster

            cluster = LocalRayCluster(base / "ray").start()
            os.environ["RAY_ADDRESS"] = cluster.address
        prepare.run(stage(make_job(args, model, 1), "prepare", base / "prepared"))

        runs = {}
        for name, nodes, on_ray in (
            ("one-node verl", 1, False),
            ("ray x1", 1, True),
            ("ray x2", 2, True),
        ):
            root = base / name.replace(" ", "-")
            shutil.copytree(base / "prepared" / "data", root / "data")
            started = time.monotonic()
            launch.run(stage(make_job(args, model, nodes), "train", root), on_ray=on_ray)
            times = step_times(root)
            runs[name] = (statistics.median(times[1:] or times), time.monotonic() - started)

        params = parameters(Path(model))
        updates = args.batch_size // args.mini_batch_size
        grad_bytes = params * 4 * updates
        print()
        print(
            f"model {args.model} ({params / 1e6:.2f} M parameters), batch {args.batch_size}, "
            f"mini-batch {args.mini_batch_size}, micro-batch {args.micro_batch_size}, "
            f"{args.steps} steps, CPU"
        )
        for name, (median, wall) in runs.items():
            print(f"  {name:14s} median step {median:7.3f} s   wall incl. start-up {wall:6.1f} s")
        one, two = runs["ray x1"][0], runs["ray x2"][0]
        print(f"  2 workers / 1 worker (same global batch): {two / one:.2f}x step time")
        print(f"  verl on Ray (1 worker) / one-node verl:   {one / runs['one-node verl'][0]:.2f}x")
        workers = 2
        wire = 2 * (workers - 1) / workers * grad_bytes
        print(
            f"  gradients reduced per step: {params} x 4 B x {updates} updates = "
            f"{grad_bytes / 2**20:.2f} MiB; sent per worker in a ring all-reduce over "
            f"{workers} workers: {wire / 2**20:.2f} MiB"
        )
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
