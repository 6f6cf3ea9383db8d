"""The dashboard panels as PNGs, drawn with matplotlib from metrics.jsonl files.

A local run has no Prometheus or Grafana; the report stage calls `render_panels` so the
user still sees the same panels (same titles, units, scales) as on the cluster. Each
label (e.g. "psft", "sft") is one line, so a PSFT run and its SFT baseline share a plot.
Uses matplotlib's object API (no pyplot state), safe in any process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from psft.workflows.dashboards.panels import PanelDef, local_panels
from psft.workflows.errors import UserError

EVAL_VALUE_KEYS = ("accuracy", "avg_at_k")
DPI = 110


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file; a line torn by a crash mid-write is skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read metrics file {path}: {exc.strerror}") from None
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _series(records: list[dict[str, Any]], field: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry `field`, last record per step winning."""
    by_step: dict[float, float] = {}
    for r in records:
        step, value = _number(r.get("step")), _number(r.get(field))
        if step is not None and value is not None and "benchmark" not in r:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _format_axis(ax: Any, panel: PanelDef, values: list[float]) -> None:
    if panel.unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif panel.unit not in ("none", "short"):
        ax.set_ylabel(panel.unit)
    if panel.log_scale and values and min(values) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


def _new_figure(panel: PanelDef) -> tuple[Figure, Any]:
    fig = Figure(figsize=(panel.width * 0.5 + 1.5, panel.height * 0.45 + 0.8), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(panel.title)
    return fig, ax


def _draw_timeseries(
    panel: PanelDef, records: Mapping[str, list[dict[str, Any]]], out: Path
) -> Path | None:
    assert panel.field is not None
    fig, ax = _new_figure(panel)
    plotted: list[float] = []
    for i, (label, recs) in enumerate(records.items()):
        color = f"C{i}"
        steps, values = _series(recs, panel.field)
        if steps:
            ax.plot(steps, values, color=color, linewidth=1.4, label=label)
            plotted += values
        val_steps, val_values = _series(recs, f"val_{panel.field}")
        if val_steps:
            ax.plot(
                val_steps, val_values, color=color, linestyle="--", marker="o",
                markersize=3, linewidth=1, label=f"{label} (held-out)",
            )  # fmt: skip
            plotted += val_values
    if not plotted:
        return None
    ax.set_xlabel("step")
    _format_axis(ax, panel, plotted)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out)
    return out


def _eval_results(records: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """label -> benchmark -> Avg@k of the last record of that benchmark."""
    results: dict[str, dict[str, float]] = {}
    for label, recs in records.items():
        for r in recs:
            bench = r.get("benchmark")
            value = next((v for k in EVAL_VALUE_KEYS if (v := _number(r.get(k))) is not None), None)
            if isinstance(bench, str) and value is not None:
                results.setdefault(label, {})[bench] = value
    return results


def _draw_eval(
    panel: PanelDef, records: Mapping[str, list[dict[str, Any]]], out: Path
) -> Path | None:
    results = _eval_results(records)
    benchmarks = sorted({b for per in results.values() for b in per})
    if not benchmarks:
        return None
    fig, ax = _new_figure(panel)
    width = 0.8 / max(len(results), 1)
    for i, (label, per) in enumerate(results.items()):
        xs = [j + i * width for j, b in enumerate(benchmarks) if b in per]
        ys = [per[b] for b in benchmarks if b in per]
        bars = ax.bar(xs, ys, width=width, label=label, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{y:.1%}" for y in ys], fontsize="small")
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(benchmarks))])
    ax.set_xticklabels(benchmarks)
    ax.set_ylim(0, 1)
    _format_axis(ax, panel, [])
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out)
    return out


def render_panels(
    metrics_files: Mapping[str, Path],
    out_dir: Path,
    *,
    eval_files: Mapping[str, Path] | None = None,
) -> list[Path]:
    """Draw every local panel that has data; return the PNGs written (`<panel key>.png`).

    metrics_files: label -> metrics.jsonl of a train or grpo stage, e.g.
    {"psft": run/train/metrics.jsonl, "sft": baseline/train/metrics.jsonl}.
    eval_files: label -> JSONL of evaluation records (`benchmark` plus `accuracy` or
    `avg_at_k`); evaluation records found in metrics_files are used too.
    """
    if not metrics_files and not eval_files:
        raise UserError("render_panels: give at least one metrics.jsonl file")
    records = {label: read_records(path) for label, path in metrics_files.items()}
    eval_records = {label: list(recs) for label, recs in records.items()}
    for label, path in (eval_files or {}).items():
        eval_records.setdefault(label, []).extend(read_records(path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in local_panels():
        out = out_dir / f"{panel.key}.png"
        if panel.kind == "timeseries":
            path = _draw_timeseries(panel, records, out)
        else:
            path = _draw_eval(panel, eval_records, out)
        if path is not None:
            written.append(path)
    return written
