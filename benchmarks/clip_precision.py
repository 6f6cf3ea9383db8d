"""PSFT's clip under float32 vs bfloat16-autocast forwards, side by side in one run.

The same model, batches and optimizer settings train twice from the same weights: once
with float32 forwards, once under bfloat16 autocast (float32 master weights, as the native
engine on CUDA and verl's FSDP mixed precision do). Printed per step: the clip fraction,
the largest ratio pi/pi_old and the entropy. Under autocast the forward casts each weight
to bfloat16, whose resolution (~2^-8 relative) is coarser than one AdamW update at these
learning rates, so updates within a step are mostly invisible to the later mini-batches'
forwards until they accumulate: the ratio stays near 1 and the clip rarely acts.

    .venv/bin/python benchmarks/clip_precision.py                    # CPU autocast
    .venv/bin/python benchmarks/clip_precision.py --device cuda --lr 1e-6
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mini-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    import torch
    from step_overhead import load_batch

    from psft.trainer.engine.loop import make_minibatches
    from psft.trainer.engine.optim import build_optimizer
    from psft.trainer.engine.step import ObjectiveConfig, train_step
    from psft.trainer.model import load_model_and_tokenizer, resolve_model
    from psft.workflows.spec import PSFTSpec

    torch.manual_seed(0)
    path = resolve_model(args.model)
    base, tok = load_model_and_tokenizer(path, device=args.device, dtype="float32")
    load_args = argparse.Namespace(
        max_length=args.max_length, batch_size=args.batch_size * args.steps
    )
    rows = load_batch(tok, load_args)
    spec = PSFTSpec(
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        micro_batch_size=min(2, args.mini_batch_size),
    )
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    print(
        f"{args.model} on {args.device}, lr {args.lr:g}, batch {args.batch_size}, "
        f"{spec.updates_per_step} updates per step"
    )
    print(f"{'forwards':<10}{'step':>5}{'clip':>9}{'ratio max':>11}{'entropy':>9}")
    for mode in ("float32", "bfloat16"):
        model = copy.deepcopy(base)
        optimizer = build_optimizer(model.parameters(), learning_rate=args.lr, weight_decay=0.0)

        def context(mode: str = mode):
            if mode == "float32":
                return contextlib.nullcontext()
            return torch.autocast(device_type, dtype=torch.bfloat16)

        for step in range(args.steps):
            batch = rows[step * args.batch_size : (step + 1) * args.batch_size]
            minibatches = make_minibatches(batch, spec, tok.pad_token_id, args.device)
            with context():
                result = train_step(model, optimizer, minibatches, ObjectiveConfig())
            m = result.metrics()
            print(
                f"{mode:<10}{step + 1:>5}{m['clip_fraction']:>9.4f}{m['ratio_max']:>11.3f}"
                f"{result.entropy:>9.4f}"
            )


if __name__ == "__main__":
    main()
