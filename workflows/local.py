"""The local executor behind `psft run`: the job's stages as processes on this machine.

Each stage runs exactly as in a pod: `psft <kind> --config stage.json`, an argv list, one
process per stage, in the order of the stage DAG. A stage that finished for the same spec
is skipped on a rerun; an interrupted train stage resumes from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from psft.workflows import layout, run_folder
from psft.workflows.errors import UserError, shown
from psft.workflows.paths import PathProblem, is_s3_uri, local_folder, with_local_paths_resolved
from psft.workflows.pipeline import COMPARE_ARM, Stage, build_pipeline
from psft.workflows.spec import PSFTJob
from psft.workflows.stages import stage_config

STAGES_DIR = run_folder.STAGES_DIR


def spec_digest(job: PSFTJob) -> str:
    """Identity of a run: changes whenever anything in the spec changes."""
    text = json.dumps(job.spec.to_wire(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageResult:
    name: str
    status: str  # ran | skipped | failed
    seconds: float
    returncode: int = 0


def with_runs_dir(job: PSFTJob, runs_dir: str | None) -> PSFTJob:
    if runs_dir is None:
        return job
    if is_s3_uri(runs_dir):
        raise UserError(
            f"--runs-dir: {shown(runs_dir)} is an S3 URI, but runs go to a local folder: for "
            "S3 set spec.storage.type: s3 and spec.storage.s3"
        )
    try:
        local_folder(runs_dir)
    except PathProblem as exc:
        raise UserError(f"--runs-dir: {exc}") from None
    job = job.model_copy(deep=True)
    try:
        job.spec.storage.local.path = runs_dir
    except ValidationError as exc:
        reason = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"--runs-dir {shown(runs_dir)}: {reason}") from None
    return job


def local_job(job: PSFTJob, runs_dir: str | None) -> PSFTJob:
    """The job as this machine runs it: `--runs-dir` applied, and every `~` path and
    `file:` URI written as the path it names (psft.workflows.paths), so each stage, the run
    folder and spec.yaml see the same paths."""
    try:
        return with_local_paths_resolved(with_runs_dir(job, runs_dir))
    except PathProblem as exc:  # validate_job refuses these first; a job built in code may not
        raise UserError(str(exc)) from None


def stage_argv(kind: str, config_path: Path) -> list[str]:
    return [sys.executable, "-m", "psft.workflows.cli", kind, "--config", str(config_path)]


def _prepare_run_dir(job: PSFTJob, fresh: bool) -> Path:
    """Create the local run folder, refusing to mix two different specs in one folder."""
    if job.spec.storage.type == "s3":
        run_dir = Path.home() / ".cache" / "psft" / "local-runs" / job.metadata.name
    else:
        run_dir = Path(layout.run_root(job))
    spec_file = run_dir / layout.SPEC
    digest = spec_digest(job)
    run_folder.claim(run_dir, job.metadata.name, fresh=fresh)
    if spec_file.exists() and run_folder.spec_digest_in(spec_file) != digest:
        raise UserError(
            f"{run_dir} holds a run of a different spec for job {job.metadata.name!r} (or a "
            f"{layout.SPEC} psft cannot read); rerun with --fresh to discard it, or change "
            "metadata.name"
        )
    resolved = job.to_wire()
    resolved.setdefault("metadata", {}).setdefault("annotations", {})[
        run_folder.DIGEST_ANNOTATION
    ] = digest
    resolved.pop("status", None)
    spec_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return run_dir


def _done_marker(run_dir: Path, stage: Stage) -> Path:
    return run_dir / STAGES_DIR / f"{stage.name}.done"


def run_stage(job: PSFTJob, stage: Stage, run_dir: Path, progress: bool) -> StageResult:
    root = layout.run_root(job)
    work_dir = str(run_dir) if job.spec.storage.type == "s3" else None
    config = stage_config(job, stage, root, work_dir=work_dir, progress=progress)
    config_path = run_dir / STAGES_DIR / f"{stage.name}.json"
    config_path.write_text(config.dump())
    start = time.monotonic()
    proc = subprocess.run(stage_argv(stage.kind, config_path), check=False)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        return StageResult(stage.name, "failed", seconds, proc.returncode)
    _done_marker(run_dir, stage).write_text(json.dumps({"seconds": round(seconds, 1)}))
    return StageResult(stage.name, "ran", seconds)


def run_local(
    job: PSFTJob,
    runs_dir: str | None = None,
    only: list[str] | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> int:
    """Run every stage of the job in order; return a process exit code."""
    from rich.console import Console

    console = Console(stderr=True)
    job = local_job(job, runs_dir)
    stages = build_pipeline(job)
    names = [s.name for s in stages]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise UserError(f"--only: unknown stage(s) {unknown}; this job has {names}")
        stages = [s for s in stages if s.name in only]
    run_dir = _prepare_run_dir(job, fresh)
    console.print(
        f"[bold]psft run[/] {job.metadata.name}: stages {' -> '.join(names)}; run folder {run_dir}",
        soft_wrap=True,
    )
    results: list[StageResult] = []
    for stage in stages:
        if not only and _done_marker(run_dir, stage).exists():
            console.print(f"[dim]{stage.name}: done in an earlier run, skipped[/]")
            results.append(StageResult(stage.name, "skipped", 0.0))
            continue
        console.rule(f"[bold]{stage.name}")
        result = run_stage(job, stage, run_dir, progress)
        results.append(result)
        if result.status == "failed":
            console.print(
                f"[red]stage {stage.name} failed (exit {result.returncode})[/]; its output is "
                "above. Fix the cause and rerun the same command: finished stages are skipped "
                "and training resumes from its latest checkpoint."
            )
            return result.returncode if 0 < result.returncode < 126 else 1
    _print_outputs(console, job, run_dir, results)
    return 0


def _print_outputs(console, job: PSFTJob, run_dir: Path, results: list[StageResult]) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    table = Table(title=f"{job.metadata.name}: stages", show_edge=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for r in results:
        table.add_row(r.name, r.status, f"{r.seconds:.1f}")
    console.print(table)
    root = layout.run_root(job)
    where = [
        ("resolved spec", layout.SPEC),
        ("training metrics", layout.metrics("train")),
        ("final checkpoint", layout.final_model("train")),
        ("entropy plot", f"{layout.REPORT}/entropy.png"),
        ("evaluation", f"{layout.eval_dir('train')}/summary.json"),
        ("summary", layout.SUMMARY),
    ]
    if job.spec.compare.enabled:
        arm = f"train-{COMPARE_ARM}"
        where[2:2] = [(f"{COMPARE_ARM} arm metrics", layout.metrics(arm))]
        where[-1:-1] = [(f"{COMPARE_ARM} arm eval", f"{layout.eval_dir(arm)}/summary.json")]
    for label, key in where:
        local = run_dir / key
        if job.spec.storage.type == "s3" or local.exists():
            console.print(f"  {label:18} {root}/{key}", soft_wrap=True, highlight=False)
