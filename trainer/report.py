"""The report stage: plots and one summary.json from what earlier stages wrote.

Reads the metrics.jsonl of every training stage of the job's pipeline (`train`, the
spec.compare arm `train-sft`, `grpo`) and the eval summaries when present, and writes
`report/entropy.png`, `report/eval.png`, `report/report.md` and `summary.json`. Curves and
scores are labelled by arm (the objective: psft, sft; or grpo), so a compare job's PSFT and
SFT arms are overlaid in the same plots.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from psft.workflows import layout
from psft.workflows.benchmarks import final_or_last
from psft.workflows.errors import UserError, shown
from psft.workflows.stages import StageConfig

TRAIN_STAGES = ("train", "grpo")
"""Training stages of a job without spec.compare (training_stages gives any job's)."""


def training_stages(job: Any) -> dict[str, str]:
    """{training stage name: arm} in pipeline order (train, train-sft, grpo)."""
    from psft.workflows.pipeline import arm_of, build_pipeline

    return {s.name: arm_of(s, job) for s in build_pipeline(job) if s.kind in ("train", "grpo")}


def eval_stages(job: Any) -> dict[str, str]:
    """{eval stage's target: arm} of the job's eval stages."""
    from psft.workflows.pipeline import arm_of, build_pipeline

    return {s.target: arm_of(s, job) for s in build_pipeline(job) if s.kind == "eval" and s.target}


REWRITE = "run the stage that writes it again, or move the file aside to report without it"


def _text(path: Path) -> str | None:
    """The UTF-8 text of `path`; None when there is no such file."""
    if not path.exists():
        return None
    if not path.is_file():
        raise UserError(f"{path} is a folder, not a file; {REWRITE}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}), so not "
            f"what psft writes; {REWRITE}"
        ) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, each checked (UserError naming file and line)."""
    text = _text(path)
    if text is None:
        return []
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"{path}: line {n} is not valid JSON; {REWRITE}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {n} is not a JSON object (a record); {REWRITE}")
        step = record.get("step")
        if "step" in record and (isinstance(step, bool) or not isinstance(step, int)):
            raise UserError(
                f"{path}: line {n} has step {shown(step)}, not a whole number; {REWRITE}"
            )
        records.append(record)
    return records


def read_json(path: Path) -> dict[str, Any] | None:
    """An eval summary.json, checked: an object whose results are objects with numeric
    scores (UserError naming the file otherwise); None when there is no such file."""
    text = _text(path)
    if text is None:
        return None
    try:
        summary = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if isinstance(exc, ValueError) else ""
        raise UserError(f"{path} is not valid JSON{where}; {REWRITE}") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} is not a JSON object (an evaluation summary); {REWRITE}")
    rows = summary.get("results", summary.get("benchmarks", []))
    if not isinstance(rows, list):
        raise UserError(f"{path}: results is {shown(rows)}, not a list of scores; {REWRITE}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue  # eval_rows keeps only objects with a benchmark
        for key in ("avg_at_k", "pass_at_k", "maj_at_k"):
            if key in row and not _is_number(row[key]):
                raise UserError(
                    f"{path}: results[{i}].{key} is {shown(row[key])}, not a number; {REWRITE}"
                )
    return summary


def step_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a finite `key`."""
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, int | float) and math.isfinite(value) and "step" in r:
            steps.append(int(r["step"]))
            values.append(float(value))
    return steps, values


def summarize_training(records: list[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {}
    _, entropy = step_series(records, "entropy")
    last = records[-1]
    _, val_loss = step_series(records, "val_loss")
    _, val_entropy = step_series(records, "val_entropy")
    _, clip = step_series(records, "clip_fraction")
    keys = ("loss", "entropy", "clip_fraction", "ratio_mean", "approx_kl", "grad_norm")
    return {
        "steps": int(last.get("step", len(records))),
        "total_steps": last.get("total_steps"),
        "tokens": last.get("tokens"),  # cumulative in each record
        "elapsed_s": last.get("elapsed_s"),
        "final": {k: last[k] for k in keys if k in last},
        "entropy": (
            {"first": entropy[0], "last": entropy[-1], "min": min(entropy)} if entropy else {}
        ),
        "val_loss": {"first": val_loss[0], "last": val_loss[-1]} if val_loss else {},
        "val_entropy": {"first": val_entropy[0], "last": val_entropy[-1]} if val_entropy else {},
        "clip_fraction_mean": sum(clip) / len(clip) if clip else None,
        "clip_active_steps": sum(1 for c in clip if c > 0.01) if clip else None,
    }


def plot_training(runs: dict[str, list[dict[str, Any]]], out: Path) -> Path | None:
    """Entropy and loss per step (validation NLL as markers where present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: recs for name, recs in runs.items() if recs}
    if not runs:
        return None
    fig, (ax_ent, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        ax_ent.plot(*step_series(records, "entropy"), label=f"{name} entropy")
        val_steps, val_entropy = step_series(records, "val_entropy")
        if val_entropy:
            ax_ent.plot(val_steps, val_entropy, "o--", label=f"{name} held-out entropy")
        # NLL of the demonstrations is comparable across objectives; the PSFT surrogate
        # (about -1 by construction) stays in metrics.jsonl as `loss`
        key = "nll" if step_series(records, "nll")[1] else "loss"
        ax_loss.plot(*step_series(records, key), label=f"{name} {key}")
        val_steps, val = step_series(records, "val_loss")
        if val:
            ax_loss.plot(val_steps, val, "o--", label=f"{name} held-out NLL")
    ax_ent.set(title="Token entropy (response tokens)", xlabel="step", ylabel="nats")
    ax_loss.set(title="Loss: NLL of demonstration tokens", xlabel="step", ylabel="nats")
    for ax in (ax_ent, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def eval_rows(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Flatten an eval summary into rows of checkpoint, benchmark and scores."""
    if not summary:
        return []
    rows = summary.get("results", summary.get("benchmarks", []))
    return [r for r in rows if isinstance(r, dict) and "benchmark" in r]


def plot_eval(rows: list[dict[str, Any]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    arms = list(dict.fromkeys(str(r.get("arm", "")) for r in rows))
    several = len(arms) > 1

    ks = list(dict.fromkeys(r.get("k", "k") for r in rows))

    def label(r: dict[str, Any]) -> str:
        arm = f"{r.get('arm', '')} " if several else ""
        k = f" @{r.get('k', 'k')}" if len(ks) > 1 else ""  # eval.samplesPerBenchmark
        return f"{r['benchmark']}{k}\n{arm}{r.get('checkpoint', '')}".strip()

    labels = [label(r) for r in rows]
    values = [100 * float(r.get("avg_at_k", 0.0)) for r in rows]
    palette = ["#4878d0", "#ee854a", "#6acc64", "#d65f5f"]
    colors = [palette[arms.index(str(r.get("arm", ""))) % len(palette)] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.6))
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="%.1f")
    title = f"Avg@{ks[0]} (%)" if len(ks) == 1 else "Avg@k (%), k per bar"
    ax.set(title=title, ylim=(0, max(100.0, *values)))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_report(summary: dict[str, Any]) -> str:
    lines = [f"# {summary['job']}: {summary['objective']} on {summary['model']}", ""]
    for stage, info in summary["training"].items():
        if not info:
            continue
        ent = info.get("entropy", {})
        lines += [
            f"## {stage}",
            f"- steps: {info['steps']}, tokens: {info['tokens']}",
            f"- entropy first/last/min: {ent.get('first', 'n/a')} / {ent.get('last', 'n/a')} / "
            f"{ent.get('min', 'n/a')}",
            f"- final: {json.dumps(info['final'])}",
            "",
        ]
    if summary.get("comparison"):
        lines += comparison_table(summary["comparison"])
    for arm, best in (summary.get("best_checkpoint") or {}).items():
        lines += [
            f"Best checkpoint{f' of arm {arm}' if arm else ''}: **{best['checkpoint']}**, mean "
            f"Avg@k {best['mean_avg_at_k']:.3f} over {', '.join(best['benchmarks'])}",
            "",
        ]
    if summary["eval"]:
        lines += [
            "## Evaluation",
            "",
            "| arm | checkpoint | benchmark | k | Avg@k | pass@k | maj@k |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in summary["eval"]:
            lines.append(
                f"| {r.get('arm', '')} | {r.get('checkpoint', '')} | {r['benchmark']} | "
                f"{r.get('k', '')} | {r.get('avg_at_k', float('nan')):.3f} | "
                f"{r.get('pass_at_k', float('nan')):.3f} | {r.get('maj_at_k', float('nan')):.3f} |"
            )
    return "\n".join(lines) + "\n"


def best_checkpoints(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm, the evaluated checkpoint with the highest mean Avg@k over its math
    benchmarks (the seed's "best in-domain checkpoint"; every benchmark when none is math).
    Only arms with more than one evaluated checkpoint (eval.checkpoints: all)."""
    out: dict[str, dict[str, Any]] = {}
    arms = dict.fromkeys(str(r.get("arm", "")) for r in rows)
    for arm in arms:
        mine = [r for r in rows if str(r.get("arm", "")) == arm]
        math = [r for r in mine if r.get("type") == "math"] or mine
        by_checkpoint: dict[str, list[float]] = {}
        for r in math:
            if isinstance(r.get("avg_at_k"), int | float):
                by_checkpoint.setdefault(str(r.get("checkpoint", "")), []).append(r["avg_at_k"])
        if len(by_checkpoint) < 2:
            continue
        means = {c: sum(v) / len(v) for c, v in by_checkpoint.items()}
        best = max(means, key=lambda c: means[c])
        out[arm] = {
            "checkpoint": best,
            "mean_avg_at_k": means[best],
            "benchmarks": sorted({r["benchmark"] for r in math}),
        }
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


def compare_arms(summary: dict[str, Any], arms: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Side-by-side figures of the arms of a spec.compare job: {arm: figures}."""
    out: dict[str, dict[str, Any]] = {}
    for stage, arm in arms.items():
        info = summary["training"].get(stage)
        if not info or arm == "grpo":
            continue
        final, entropy = info.get("final", {}), info.get("entropy", {})
        figures = {
            "stage": stage,
            "steps": info.get("steps"),
            "entropy_first": entropy.get("first"),
            "entropy_last": entropy.get("last"),
            "clip_fraction_mean": info.get("clip_fraction_mean"),
            "clip_active_steps": info.get("clip_active_steps"),
            "val_loss_first": info.get("val_loss", {}).get("first"),
            "val_loss_last": info.get("val_loss", {}).get("last"),
            "val_entropy_last": info.get("val_entropy", {}).get("last"),
            "grad_norm_last": final.get("grad_norm"),
        }
        for bench, row in final_or_last(r for r in summary["eval"] if r.get("arm") == arm).items():
            figures[f"avg_at_k/{bench}"] = row.get("avg_at_k")
        out[arm] = figures
    return out


def comparison_table(comparison: dict[str, dict[str, Any]]) -> list[str]:
    arms = list(comparison)
    keys = [k for k in dict.fromkeys(k for f in comparison.values() for k in f) if k != "stage"]
    lines = ["## PSFT vs SFT (spec.compare)", "", "| | " + " | ".join(arms) + " |"]
    lines.append("|---|" + "---|" * len(arms))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(comparison[a].get(key)) for a in arms) + " |")
    return [*lines, ""]


def build_summary(job_dir: Path, config: StageConfig) -> dict[str, Any]:
    job = config.job
    arms = training_stages(job)
    training = {}
    for stage, arm in arms.items():
        info = summarize_training(read_jsonl(job_dir / layout.metrics(stage)))
        training[stage] = {"arm": arm, **info} if info else {}
    evals = []
    for target, arm in eval_stages(job).items():
        rows = eval_rows(read_json(job_dir / layout.eval_dir(target) / "summary.json"))
        evals += [{"arm": arm, **r} for r in rows]
    artifacts = {
        "spec": layout.SPEC,
        "train_metrics": layout.metrics("train"),
        "final_checkpoint": layout.final_model("train"),
        "report": layout.REPORT,
    }
    if job.spec.grpo.enabled:
        artifacts["grpo_checkpoint"] = layout.final_model("grpo")
    return {
        "job": job.metadata.name,
        "namespace": job.metadata.namespace,
        "objective": job.spec.psft.objective,
        "model": job.spec.model.source,
        "run_root": config.run_root,
        "training": {k: v for k, v in training.items() if v},
        "eval": evals,
        "best_checkpoint": best_checkpoints(evals),
        "comparison": (
            compare_arms({"training": training, "eval": evals}, arms)
            if job.spec.compare.enabled
            else {}
        ),
        "artifacts": artifacts,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _pull_optional(store: Any, key: str) -> None:
    if store.exists(key):
        store.pull(key)


def run(config: StageConfig) -> None:
    from psft.trainer.storage import open_run_store

    store = open_run_store(config)
    arms = training_stages(config.job)
    for stage in arms:
        _pull_optional(store, layout.metrics(stage))
        _pull_optional(store, f"{layout.eval_dir(stage)}/summary.json")
    job_dir = Path(store.work_dir)
    report_dir = job_dir / layout.REPORT
    summary = build_summary(job_dir, config)
    runs = {arm: read_jsonl(job_dir / layout.metrics(stage)) for stage, arm in arms.items()}
    plots = [
        plot_training(runs, report_dir / "entropy.png"),
        plot_eval(summary["eval"], report_dir / "eval.png"),
    ]
    plots += _dashboard_panels(job_dir, report_dir, list(arms))
    summary["artifacts"]["plots"] = [str(p.relative_to(job_dir)) for p in plots if p is not None]
    (report_dir / "report.md").write_text(markdown_report(summary))
    (job_dir / layout.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    store.push(layout.REPORT)
    store.push(layout.SUMMARY)
    print(markdown_report(summary))


def _dashboard_panels(
    job_dir: Path, report_dir: Path, stages: list[str] | tuple[str, ...] = TRAIN_STAGES
) -> list[Path | None]:
    """The Grafana dashboards' panels drawn from metrics.jsonl (psft.workflows.dashboards)."""
    try:
        from psft.workflows.dashboards import render_panels
    except ImportError:
        return []
    files = {s: job_dir / layout.metrics(s) for s in stages}
    files = {s: p for s, p in files.items() if p.is_file()}
    if not files:
        return []
    return list(render_panels(files, report_dir / "panels"))
