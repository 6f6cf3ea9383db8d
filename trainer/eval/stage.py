"""The eval stage: `psft eval --config stage.json` (and `psft evaluate MODEL`).

For each selected checkpoint of the target stage (train or grpo) and each benchmark:
generate k samples per problem, grade them, and write

    <eval dir>/<checkpoint>/<benchmark>.jsonl   one line per sample: problem id, sample
                                                index, response, extracted answer, verdict
    <eval dir>/summary.json                     one row per (checkpoint, benchmark)
    <eval dir>/metrics.jsonl                    the same rows, through Telemetry
                                                (psft_eval_accuracy{benchmark,k}, ...)

where <eval dir> is `layout.eval_dir(target)`. Everything that can be checked without a
model is checked first: benchmark names and files, and that the checkpoints exist.
A config without a target evaluates `model.source` itself (the standalone command).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psft.trainer.eval.backends import choose_backend
from psft.trainer.eval.backends.base import Backend, Generation, SamplingConfig
from psft.trainer.eval.grading import GradeTask, GradingPool, Verdict
from psft.trainer.eval.metrics import Sample, summarize
from psft.trainer.eval.progress import GenerationProgress
from psft.trainer.eval.prompts import encode_prompts, eval_system_prompt
from psft.trainer.eval.registry import Benchmark, load_benchmark
from psft.workflows import layout
from psft.workflows.errors import UserError
from psft.workflows.stages import StageConfig

STANDALONE_CHECKPOINT = "model"


@dataclass(frozen=True)
class Checkpoint:
    name: str
    """Folder name under the eval dir: `final`, `step-N`, or `model` (standalone)."""
    key: str | None
    """Run-store key of the model folder; None for a model outside the run."""
    source: str | None = None
    """Standalone: model.source (a folder, s3:// URI or registered name)."""
    step: int | None = None


# ---------------------------------------------------------------------------------------
# which checkpoints


def _read_metrics(store: Any, target: str) -> list[dict[str, Any]]:
    key = layout.metrics(target)
    if not store.exists(key):
        raise UserError(
            f"{key} is missing from the run at {store.root}: eval.checkpoints 'best' and 'all' "
            f"read it; run the {target} stage first"
        )
    path = store.pull(key)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text (byte at offset {exc.start}), so not the metrics psft "
            f"writes; run the {target} stage again, or set eval.checkpoints: final"
        ) from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _final(store: Any, target: str) -> Checkpoint:
    key = layout.final_model(target)
    if not store.exists(key):
        raise UserError(
            f"checkpoint {key} does not exist in the run at {store.root}; run the {target} "
            "stage first (nothing was generated)"
        )
    return Checkpoint("final", key)


def _saved_steps(
    store: Any, target: str, records: list[dict[str, Any]], save_every: int
) -> list[int]:
    """Steps whose resumable checkpoint is still stored (pruning keeps only the newest)."""
    steps = sorted({r["step"] for r in records})
    if target != "grpo" and steps:  # train saves every saveEvery steps and at the end
        steps = [s for s in steps if (save_every and s % save_every == 0) or s == steps[-1]]
    return [s for s in steps if store.exists(layout.checkpoint(target, s))]


def select_checkpoints(store: Any, config: StageConfig) -> list[Checkpoint]:
    """The checkpoints to evaluate, all verified to exist (UserError otherwise)."""
    if config.target is None:
        from psft.trainer.model import resolve_model

        path = resolve_model(config.job.spec.model.source)  # a clear error when missing
        return [Checkpoint(STANDALONE_CHECKPOINT, None, source=str(path))]
    target = config.target
    which = config.job.spec.eval.checkpoints
    if which == "final":
        return [_final(store, target)]
    records = _read_metrics(store, target)
    if which == "all":
        final = _final(store, target)
        last = max((r["step"] for r in records), default=None)
        saved = [
            Checkpoint(f"step-{s}", layout.checkpoint(target, s), step=s)
            for s in _saved_steps(store, target, records, config.job.spec.psft.save_every)
            if s != last  # the last step's checkpoint holds the final model
        ]
        return [*saved, Checkpoint(final.name, final.key, step=last)]
    # best by validation loss
    validated = {  # step 0 is the starting policy's baseline: no checkpoint of this run
        r["step"]: float(r["val_loss"])
        for r in records
        if isinstance(r.get("val_loss"), int | float) and r["step"] > 0
    }
    if not validated:
        raise UserError(
            f"eval.checkpoints is 'best' but {layout.metrics(target)} has no val_loss: set "
            "dataset.validation (files or fraction) so training measures held-out loss"
        )
    last = max(r["step"] for r in records)
    candidates: dict[int, Checkpoint] = {}
    for step in validated:
        if step == last and store.exists(layout.final_model(target)):
            candidates[step] = Checkpoint("final", layout.final_model(target), step=step)
        elif store.exists(layout.checkpoint(target, step)):
            candidates[step] = Checkpoint(
                f"step-{step}", layout.checkpoint(target, step), step=step
            )
    if not candidates:
        raise UserError(
            f"eval.checkpoints is 'best' but none of the validated steps "
            f"({', '.join(map(str, sorted(validated)))}) has a saved checkpoint; save at "
            "the validation steps (psft.saveEvery) and keep them (psft.keepCheckpoints)"
        )
    best = min(candidates, key=lambda s: (validated[s], s))
    return [candidates[best]]


def model_folder(path: Path, name: str) -> Path:
    """The Hugging Face folder inside a checkpoint (itself, or model/ or hf/ within)."""
    for candidate in (path, path / "model", path / "hf"):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"checkpoint {name} at {path} holds no Hugging Face model (config.json)")


def checked_model_folder(store: Any, ckpt: Checkpoint, config: StageConfig) -> Path:
    """The model folder of `ckpt`, its files checked without loading it (UserError)."""
    from psft.trainer.model import check_model_folder

    if ckpt.key is None:
        path = Path(str(ckpt.source))
        check_model_folder(path)
        return path
    path = model_folder(store.pull(ckpt.key), ckpt.name)
    check_model_folder(
        path,
        f"checkpoint {ckpt.name} of the {config.target} stage",
        f"run the {config.target} stage again to write it",
    )
    return path


# ---------------------------------------------------------------------------------------
# generation and grading


def open_backend(name: str, path: Path, config: StageConfig) -> tuple[Backend, Any]:
    """(backend, tokenizer) for a model folder."""
    spec = config.job.spec
    if name == "vllm":
        from psft.trainer.eval.backends.vllm import VLLMBackend
        from psft.trainer.model import load_tokenizer
        from psft.workflows.models import context_length_of

        tokenizer = load_tokenizer(
            path,
            chat_template=spec.model.chat_template,
            trust_remote_code=spec.model.trust_remote_code,
        )
        backend: Backend = VLLMBackend(
            path,
            tensor_parallel_size=spec.eval.tensor_parallel_size,
            dtype=spec.model.dtype,
            seed=spec.eval.seed,
            trust_remote_code=spec.model.trust_remote_code,
            context_length=spec.model.max_context_length or context_length_of(str(path)),
        )
        return backend, tokenizer
    from psft.trainer.eval.backends.transformers import TransformersBackend

    tb = TransformersBackend.load(
        path,
        device=spec.resources.device,
        dtype=spec.model.dtype,
        chat_template=spec.model.chat_template,
        trust_remote_code=spec.model.trust_remote_code,
        batch_size=spec.eval.batch_size,
    )
    return tb, tb.tokenizer


def sampling_config(config: StageConfig, benchmark: str | None = None) -> SamplingConfig:
    """Sampling of `benchmark` (eval.samplesPerBenchmark, else eval.samples per problem)."""
    ev = config.job.spec.eval
    return SamplingConfig(
        n=ev.samples_per_benchmark.get(benchmark or "", ev.samples),
        temperature=ev.temperature,
        top_p=ev.top_p,
        max_tokens=ev.max_tokens,
        seed=ev.seed,
    )


def sample_records(
    benchmark: Benchmark, generations: list[list[Generation]], verdicts: list[Verdict]
) -> list[dict[str, Any]]:
    records = []
    flat = iter(verdicts)
    for index, (problem, samples) in enumerate(zip(benchmark.problems, generations, strict=True)):
        for sample_index, g in enumerate(samples):
            v = next(flat)
            records.append(
                {
                    "id": problem.id,
                    "problem_index": index,
                    "sample": sample_index,
                    "response": g.text,
                    "answer": v.answer,
                    "reference": problem.answer,
                    "correct": v.correct,
                    "timed_out": v.timed_out,
                    "tokens": g.tokens,
                    "truncated": g.truncated,
                }
            )
    return records


def evaluate_benchmark(
    backend: Backend,
    tokenizer: Any,
    benchmark: Benchmark,
    config: StageConfig,
    pool: GradingPool,
    log: Callable[[str], None] = lambda _: None,
    **progress_options: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(sample records, score row) of one benchmark on one loaded model.

    Generation progress goes to stderr (`GenerationProgress`; `progress_options` are its
    keyword arguments, e.g. `stream` and `interval`)."""
    sampling = sampling_config(config, benchmark.name)
    prompts = encode_prompts(tokenizer, benchmark, eval_system_prompt(config.job.spec))
    log(
        f"{benchmark.name}: generating {len(prompts)} problems x {sampling.n} samples "
        f"(up to {sampling.max_tokens} tokens each)"
    )
    start = time.monotonic()
    with GenerationProgress(
        benchmark.name, len(prompts), sampling.n, live=config.progress, **progress_options
    ) as progress:
        generations = backend.generate(prompts, sampling, progress)
    gen_seconds = time.monotonic() - start
    n_choices = [len(p.choices) or 4 for p in benchmark.problems]
    phrase = config.job.spec.eval.accept_answer_phrase
    tasks = [
        GradeTask(g.text, problem.answer, benchmark.kind, n, answer_phrase=phrase)
        for problem, n, samples in zip(benchmark.problems, n_choices, generations, strict=True)
        for g in samples
    ]
    log(f"{benchmark.name}: grading {len(tasks)} samples")
    verdicts = pool.grade(tasks)
    records = sample_records(benchmark, generations, verdicts)
    k = sampling.n
    per_problem = [
        [Sample(r["answer"], r["correct"], r["tokens"], r["truncated"]) for r in records[i : i + k]]
        for i in range(0, len(records), k)
    ]
    scores = summarize(per_problem)
    generated = sum(r["tokens"] for r in records)
    row = {
        "benchmark": benchmark.name,
        "type": benchmark.kind,
        **scores,
        "timed_out": sum(r["timed_out"] for r in records),
        "generated_tokens": generated,
        "generation_s": round(gen_seconds, 3),
        "tokens_per_second": generated / gen_seconds if gen_seconds > 0 else None,
    }
    return records, row


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def _stderr(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def run(config: StageConfig) -> dict[str, Any]:
    from psft.trainer.storage import open_run_store
    from psft.trainer.telemetry import Telemetry

    job = config.job
    ev = job.spec.eval
    store = open_run_store(config)
    out_dir = layout.eval_dir(config.target or "train")
    log = _stderr  # plain lines: pod logs need them most (config.progress: a live bar)

    # everything checkable without a model, before any generation
    benchmarks = [load_benchmark(b).limited(ev.limit) for b in ev.benchmarks]
    if not benchmarks:
        raise UserError("eval.benchmarks is empty: name at least one benchmark")
    checkpoints = select_checkpoints(store, config)
    # every model folder is checked before the earlier results are replaced
    folders = {ckpt.name: checked_model_folder(store, ckpt, config) for ckpt in checkpoints}
    backend_name = choose_backend(ev.backend)
    log(
        f"{len(checkpoints)} checkpoint(s) x {len(benchmarks)} benchmark(s), k={ev.samples}"
        + "".join(f", {name} k={k}" for name, k in ev.samples_per_benchmark.items())
        + ", "
        f"backend={backend_name}"
    )

    rows: list[dict[str, Any]] = []
    metrics_path = store.local_path(f"{out_dir}/metrics.jsonl")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text("")  # a rerun replaces the rows (and the published copy on close)
    with (
        GradingPool(timeout=ev.grading_timeout) as pool,
        Telemetry(config, metrics_path, store=store) as telemetry,
    ):
        for ckpt in checkpoints:
            path = folders[ckpt.name]
            log(f"checkpoint {ckpt.name}: loading {path}")
            backend, tokenizer = open_backend(backend_name, path, config)
            try:
                for benchmark in benchmarks:
                    records, row = evaluate_benchmark(
                        backend, tokenizer, benchmark, config, pool, log
                    )
                    row = {"checkpoint": ckpt.name, "checkpoint_step": ckpt.step, **row}
                    key = f"{out_dir}/{ckpt.name}/{_file_name(benchmark.name)}.jsonl"
                    _write_jsonl(store.local_path(key), records)
                    store.push(key)
                    telemetry.log(row)
                    rows.append(row)
                    log(
                        f"{ckpt.name} {benchmark.name}: Avg@{row['k']} {row['avg_at_k']:.3f} "
                        f"pass@{row['k']} {row['pass_at_k']:.3f} maj@{row['k']} "
                        f"{row['maj_at_k']:.3f} ({row['problems']} problems)"
                    )
            finally:
                backend.close()

    summary = {
        "target": config.target,
        "model": job.spec.model.source,
        "backend": backend_name,
        "settings": ev.to_wire(),
        "checkpoints": [c.name for c in checkpoints],
        "results": rows,
    }
    summary_key = f"{out_dir}/summary.json"
    path = store.local_path(summary_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    store.push(summary_key)
    return summary


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
