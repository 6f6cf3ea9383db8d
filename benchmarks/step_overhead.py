"""PSFT vs SFT step time on the same model, batch and tokens, side by side in one process.

Two copies of the model (same weights) take turns, step by step (PSFT, SFT, PSFT, ...),
on the same global batch of real demonstrations, so machine noise hits both alike. PSFT
adds the no-grad forwards that give old log-probs of mini-batches 2..k (the first one's
ratio is exactly 1 and shares its training forward); the target is PSFT/SFT <= 1.35.

    .venv/bin/python benchmarks/step_overhead.py                  # SmolLM2-135M, CPU
    .venv/bin/python benchmarks/step_overhead.py --model tiny     # tiny random Llama
    .venv/bin/python benchmarks/step_overhead.py --device cuda --batch-size 64 \\
        --mini-batch-size 8 --micro-batch-size 8 --max-length 1024
    # GPU figures: a random-initialised model shaped like Qwen2.5-0.5B on 4k-token sequences
    python3 benchmarks/step_overhead.py --model qwen2.5-0.5b-random --synthetic-length 4096 \\
        --device cuda --dtype bfloat16 --batch-size 32 --mini-batch-size 8 --micro-batch-size 2

Prints median step time, tokens/s, the ratio, and on CUDA the model FLOPs utilisation
(6 * params * tokens per update, 2 * params * tokens per extra forward, vs the GPU's
dense bf16 peak; attention FLOPs are left out, so at long sequences MFU reads low).
Data: examples/data/math_train.jsonl (MATH-500 worked solutions), or with
--synthetic-length random token sequences of that length (the first eighth is prompt).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "math_train.jsonl"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


# Qwen2.5-0.5B's shape (its config.json), for GPU figures without its weights
QWEN25_05B_SHAPE = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
RANDOM_MODELS = {"qwen2.5-0.5b-random": QWEN25_05B_SHAPE}


def random_model(name: str, device: str, dtype):
    """A randomly initialised Qwen2 model of a known shape (no tokenizer: synthetic data)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**RANDOM_MODELS[name], attention_dropout=0.0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()


def synthetic_batch(args: argparse.Namespace, vocab_size: int):
    """batch_size random sequences of exactly --synthetic-length tokens."""
    import random

    from psft.trainer.data import Example

    rng = random.Random(0)
    prompt = args.synthetic_length // 8
    return [
        Example(
            id=f"synthetic-{i}",
            prompt=[],
            demonstration="",
            input_ids=[rng.randrange(vocab_size) for _ in range(args.synthetic_length)],
            response_start=prompt,
        )
        for i in range(args.batch_size)
    ]


def resolve(model: str, tmp: Path) -> Path:
    if model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_model import make_tiny_model

        return make_tiny_model(tmp / "tiny", hidden=64, layers=4)
    from psft.trainer.model import resolve_model

    return resolve_model(model)


def load_batch(tokenizer, args: argparse.Namespace):
    """The first batch_size rows of the quickstart data, tokenised like the prepare stage."""
    from psft.trainer.data import SplitStats, Tokenise, load_examples
    from psft.workflows.spec import DatasetSpec

    spec = DatasetSpec(
        train=[str(DATA)],
        max_prompt_length=args.max_length // 2,
        max_response_length=args.max_length // 2,
        truncation="right",
    )
    rows = load_examples([str(DATA)], spec, Tokenise(tokenizer, spec), SplitStats())
    if len(rows) < args.batch_size:
        raise SystemExit(f"only {len(rows)} rows in {DATA}")
    return rows[: args.batch_size]


def peak_tflops(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="name, path or 'tiny'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mini-batch-size", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256, help="prompt + response tokens")
    parser.add_argument(
        "--synthetic-length", type=int, default=0, help="random sequences of this many tokens"
    )
    parser.add_argument("--steps", type=int, default=3, help="measured steps per objective")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per objective")
    args = parser.parse_args()

    import torch

    from psft.trainer.engine.loop import make_minibatches
    from psft.trainer.engine.optim import build_optimizer
    from psft.trainer.engine.precision import resolve_precision
    from psft.trainer.engine.step import ObjectiveConfig, train_step
    from psft.trainer.model import load_model_and_tokenizer, resolve_device
    from psft.workflows.spec import PSFTSpec

    device = resolve_device(args.device)
    precision = resolve_precision(args.dtype, device)
    torch.manual_seed(0)
    if args.model in RANDOM_MODELS:
        if not args.synthetic_length:
            raise SystemExit(f"--model {args.model} has no tokenizer: give --synthetic-length")
        base = random_model(args.model, device, precision.param_dtype)
        pad_id = 0
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = resolve(args.model, Path(tmp))
            base, tok = load_model_and_tokenizer(path, device=device, dtype=precision.param_dtype)
        pad_id = tok.pad_token_id
    models = {"psft": base, "sft": copy.deepcopy(base)}
    spec = PSFTSpec(
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        micro_batch_size=args.micro_batch_size,
    )
    if args.synthetic_length:
        batch = synthetic_batch(args, base.config.vocab_size)
    else:
        batch = load_batch(tok, args)
    minibatches = make_minibatches(batch, spec, pad_id, device)
    tokens = sum(int(m["attention_mask"].sum()) for mb in minibatches for m in mb)
    # tiny learning rate: the weights barely move, so both objectives see the same numbers
    optims = {
        k: build_optimizer(m.parameters(), learning_rate=1e-7, weight_decay=0.0)
        for k, m in models.items()
    }
    times: dict[str, list[float]] = {"psft": [], "sft": []}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for i in range(args.warmup + args.steps):
        for objective in ("psft", "sft"):
            sync()
            with precision.autocast():
                result = train_step(
                    models[objective],
                    optims[objective],
                    minibatches,
                    # plain SFT, as other trainers run it: no pre-step entropy forwards
                    ObjectiveConfig(objective=objective, pre_step_entropy=False),
                )
            sync()
            if i >= args.warmup:
                times[objective].append(result.seconds)

    n_params = sum(p.numel() for p in base.parameters())
    k = len(minibatches)
    per_mb_tokens = tokens / k
    flops = {
        "sft": 6 * n_params * tokens,
        "psft": 6 * n_params * tokens + 2 * n_params * per_mb_tokens * (k - 1),
    }
    peak = peak_tflops(device)
    print(
        f"model {args.model} ({n_params / 1e6:.1f}M params) on {device} "
        f"{precision.describe()}; batch {args.batch_size}, "
        f"mini-batch {args.mini_batch_size} ({k} updates/step), micro-batch "
        f"{args.micro_batch_size}, {tokens} tokens/step; median of {args.steps} steps "
        f"after {args.warmup} warm-up"
    )
    print(f"{'objective':<10}{'step s':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
    medians = {}
    for objective in ("sft", "psft"):
        med = statistics.median(times[objective])
        medians[objective] = med
        tflops = flops[objective] / med / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        print(f"{objective:<10}{med:>10.3f}{tokens / med:>12.1f}{tflops:>10.3f}{mfu:>8}")
    ratio = medians["psft"] / medians["sft"]
    expected = (6 * tokens + 2 * per_mb_tokens * (k - 1)) / (6 * tokens)
    print(f"PSFT/SFT step time ratio: {ratio:.3f} (FLOPs model: {expected:.3f}; target <= 1.35)")
    print("all step times:", {k2: [round(t, 3) for t in v] for k2, v in times.items()})
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
