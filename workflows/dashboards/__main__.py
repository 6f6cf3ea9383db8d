"""Regenerate the committed Grafana dashboards: `python -m psft.workflows.dashboards`.

With `--check`, compare instead of writing and exit 1 when the committed files are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psft.workflows.dashboards.grafana import dashboard_files, write_dashboards

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "charts" / "psft" / "dashboards"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m psft.workflows.dashboards")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    if not args.check:
        for path in write_dashboards(args.out):
            print(path)
        return 0
    stale = [
        name
        for name, text in dashboard_files().items()
        if not (args.out / name).is_file() or (args.out / name).read_text() != text
    ]
    for name in stale:
        print(f"{args.out / name} is out of date: run python -m psft.workflows.dashboards")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
