"""Wall time of `psft run` on an example, stage by stage, against its time target.

    .venv/bin/python benchmarks/quickstart.py                           # the quickstart
    .venv/bin/python benchmarks/quickstart.py examples/compare.yaml --target 0

Runs the example afresh in a temporary runs folder (nothing of runs/ is touched), then
prints each stage's seconds (from the run's stage markers), the total, the share of steps
whose clip fraction is above 1% per training stage, and the verdict against --target
seconds (the quickstart's promise: under 5 minutes on 2 idle CPU cores after installation).
Machines here are noisy: run it on an idle machine, and read the numbers, not a pass/fail.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(REPO / "examples" / "quickstart.yaml"))
    parser.add_argument("--target", type=float, default=300.0, help="seconds; 0: none")
    parser.add_argument("--keep", help="copy the run folder here (report, metrics) at the end")
    args = parser.parse_args()

    job = yaml.safe_load(Path(args.spec).read_text())
    with tempfile.TemporaryDirectory(prefix="psft-bench-") as tmp:
        job["spec"].setdefault("storage", {})["local"] = {"path": tmp}
        spec = Path(tmp) / "job.yaml"
        spec.write_text(yaml.safe_dump(job))
        began = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "psft.workflows.cli", "run", str(spec), "--no-progress"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        total = time.monotonic() - began
        if proc.returncode != 0:
            sys.exit(f"psft run failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr}")
        run = Path(tmp) / job["metadata"]["name"]
        print(f"{args.spec}: psft run, {total:.1f} s in all")
        print(f"{'stage':<12}{'seconds':>10}")
        for marker in sorted((run / "stages").glob("*.done"), key=lambda p: p.stat().st_mtime):
            seconds = json.loads(marker.read_text()).get("seconds")
            print(f"{marker.stem:<12}{seconds:>10.1f}")
        for metrics in sorted(run.glob("train*/metrics.jsonl")):
            records = [json.loads(x) for x in metrics.read_text().splitlines()]
            clip = [r["clip_fraction"] for r in records if "clip_fraction" in r]
            active = sum(c > 0.01 for c in clip)
            mean = sum(clip) / max(len(clip), 1)
            print(
                f"{metrics.parent.name}: {len(clip)} steps, clip fraction > 1% on {active} "
                f"({active / max(len(clip), 1):.0%}), mean {mean:.3f}"
            )
        if args.keep:
            shutil.copytree(
                run,
                Path(args.keep) / run.name,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("checkpoints", "final", "*.safetensors"),
            )
            print(f"run folder copied to {Path(args.keep) / run.name}")
        if args.target:
            verdict = "within" if total <= args.target else "OVER"
            print(f"target {args.target:.0f} s: {verdict} ({total / args.target:.2f} of it)")


if __name__ == "__main__":
    main()
