"""How much each demonstration weighs under each `lossAggMode`, for LIMO-like lengths.

Every mode computes a mini-batch loss of the form (1/M) * sum_i w_i * mean_t loss_{i,t} over
the M demonstrations i of a mini-batch; w_i is the demonstration's weight relative to an
equal share (w_i = 1 for all i is seq-mean-token-mean). With L_i the response tokens of i:

    token-mean            w_i = M * L_i / sum_{j in mini-batch} L_j
    seq-mean-token-mean   w_i = 1
    seq-mean-token-sum    w_i = L_i             (token-mean's relative weights, times the
                                                 mean length: the loss scale grows with it)
    micro-token-mean      w_i = k * L_i / sum_{j in i's micro-batch} L_j   (k per micro-batch)

`micro-token-mean` with k = 1 is the seed's run (8 GPUs, mini-batch 8: one demonstration
per GPU, hence per micro-batch); k = 2 and 4 are what the seed's code gives on 4 and 2
GPUs. The weight of a demonstration depends on its batch-mates; the table gives its mean
over random mini-batches (and micro-batches) drawn from the same lengths.

    .venv/bin/python benchmarks/loss_weights.py                       # the stated LIMO-like lengths
    .venv/bin/python benchmarks/loss_weights.py --lengths runs/JOB/data/train.parquet

Lengths: by default 817 draws (LIMO's size) of a log-normal with median 7,000 response tokens
and sigma 0.5, clipped to [500, 16,384] (the examples' maxResponseLength), seed 0: an
assumption standing in for LIMO, which is not on this machine (shortest 0.13x and longest
2.14x the mean length, the spread issue 15 quotes for LIMO). `--lengths` reads a prepared
train.parquet (input_ids, response_start) or a file of integers, one per line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MINI_BATCH = 8
MEDIAN, SIGMA, LOW, HIGH, COUNT, SEED = 7000.0, 0.5, 500, 16384, 817, 0
TRIALS = 20000


def limo_like_lengths() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    drawn = rng.lognormal(np.log(MEDIAN), SIGMA, COUNT)
    return np.clip(np.round(drawn), LOW, HIGH).astype(np.int64)


def read_lengths(path: Path) -> np.ndarray:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["input_ids", "response_start"]).to_pydict()
        pairs = zip(table["input_ids"], table["response_start"], strict=True)
        return np.array([len(ids) - start for ids, start in pairs], dtype=np.int64)
    return np.array([int(x) for x in path.read_text().split()], dtype=np.int64)


def weights(length: int, lengths: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Mean weight of a demonstration of `length` tokens over random batch-mates."""
    mates = rng.choice(lengths, size=(TRIALS, MINI_BATCH - 1))
    out = {"token-mean": float(np.mean(MINI_BATCH * length / (length + mates.sum(1))))}
    for k in (4, 2):  # micro-batch mates: the first k - 1 of the mini-batch mates
        out[f"micro-token-mean k={k}"] = float(
            np.mean(k * length / (length + mates[:, : k - 1].sum(1)))
        )
    out["micro-token-mean k=1 (seed)"] = 1.0
    out["seq-mean-token-mean"] = 1.0
    return out


def table(lengths: np.ndarray) -> str:
    rng = np.random.default_rng(1)
    mean = float(lengths.mean())
    rows = [
        ("shortest", int(lengths.min())),
        ("10th percentile", int(np.percentile(lengths, 10))),
        ("median", int(np.median(lengths))),
        ("mean", round(mean)),
        ("90th percentile", int(np.percentile(lengths, 90))),
        ("longest", int(lengths.max())),
    ]
    header = None
    lines = []
    for name, length in rows:
        w = weights(length, lengths, rng)
        if header is None:
            header = ["demonstration", "tokens", "L / mean L", *w]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
        cells = [name, f"{length:,}", f"{length / mean:.2f}", *(f"{v:.2f}" for v in w.values())]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{len(lengths)} demonstrations, mean {mean:,.0f} response tokens; mini-batch "
        f"{MINI_BATCH}. seq-mean-token-sum: token-mean's weights, with a loss {mean:,.0f}x "
        "larger on average."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lengths", type=Path, help="prepared train.parquet or integers")
    args = parser.parse_args()
    lengths = read_lengths(args.lengths) if args.lengths else limo_like_lengths()
    print(table(lengths))


if __name__ == "__main__":
    main()
