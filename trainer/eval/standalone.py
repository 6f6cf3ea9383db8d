"""`psft evaluate MODEL`: the eval stage on any checkpoint folder or registered model.

    psft evaluate runs/quickstart/train/final --benchmarks aime24 amc23 --samples 4 --limit 10
    psft evaluate smollm2-135m-instruct --benchmarks gpqa.csv:multiple-choice

It builds the same StageConfig an executor writes (a job whose model.source is MODEL and
no target) and runs `psft.trainer.eval.stage.run`, so outputs have the stage's layout:
`<out>/eval/model/<benchmark>.jsonl` and `<out>/eval/summary.json`. This module stays
import-light: the CLI imports it to build its parser.
"""

from __future__ import annotations

import argparse
import re
from contextlib import suppress
from pathlib import Path
from typing import Any

from psft.workflows.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face folder, s3:// URI, or registered model name")
    p.add_argument(
        "--benchmarks",
        nargs="+",
        default=["aime24", "aime25", "amc23"],
        metavar="NAME|FILE[:TYPE]",
        help="registered names (aime24 aime25 amc23 math500 minerva) or files; a file may end "
        "in :math (default) or :multiple-choice",
    )
    p.add_argument("--samples", "-k", type=int, default=4, help="samples per problem (k)")
    p.add_argument("--limit", type=int, help="only the first N problems of each benchmark")
    p.add_argument("--max-tokens", type=int, default=4096, help="generation budget per sample")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument(
        "--system-prompt",
        help="system message (default: the training default; '' for none)",
    )
    p.add_argument("--chat-template", type=Path, help="file with a Jinja chat template")
    p.add_argument(
        "--accept-answer-phrase",
        action="store_true",
        help='also grade a math response without a \\boxed{} answer by its last "The answer '
        "is: X\" phrase, as the seed's evaluation does (eval.acceptAnswerPhrase)",
    )
    p.add_argument("--out", type=Path, help="output folder (default runs/evaluate-<model>)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no live bar")


def benchmark_entry(text: str) -> str | dict[str, Any]:
    """A registered name stays a name; `path[:type]` becomes a custom benchmark entry."""
    path, kind = text, "math"
    match = re.fullmatch(r"(.+):(math|multiple-choice)", text)
    if match:
        path, kind = match.group(1), match.group(2)
    if not (path.lower().endswith(FILE_SUFFIXES) or path.startswith("s3://")):
        if match:
            raise UserError(f"--benchmarks {text!r}: a :{kind} suffix needs a file path")
        return text
    stem = Path(path).name.split(".")[0].lower()
    name = re.sub(r"[^a-z0-9_.-]", "-", stem).strip("-.") or "custom"
    return {"name": name, "path": path, "type": kind}


def _slug(model: str) -> str:
    parts = [p for p in re.split(r"[/\\]", model.rstrip("/")) if p and p != "s3:"]
    tail = "-".join(parts[-2:]) if parts and parts[-1] in ("final", "model") else parts[-1]
    return re.sub(r"[^a-z0-9-]", "-", tail.lower()).strip("-")[:40] or "model"


def standalone_config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from psft.workflows.spec import PSFTJob
    from psft.workflows.stages import StageConfig

    model_spec: dict[str, Any] = {"source": args.model, "dtype": args.dtype}
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            raise UserError(f"--chat-template {args.chat_template}: no such file")
        model_spec["chatTemplate"] = args.chat_template.read_text()
    eval_spec: dict[str, Any] = {
        "benchmarks": [benchmark_entry(b) for b in args.benchmarks],
        "samples": args.samples,
        "temperature": args.temperature,
        "topP": args.top_p,
        "maxTokens": args.max_tokens,
        "seed": args.seed,
        "backend": args.backend,
        "batchSize": args.batch_size,
        "tensorParallelSize": args.tensor_parallel_size,
        "limit": args.limit,
        "systemPrompt": args.system_prompt,
        "acceptAnswerPhrase": args.accept_answer_phrase,
    }
    slug = _slug(args.model)
    document = {
        "metadata": {"name": f"evaluate-{slug}"[:52].rstrip("-")},
        "spec": {
            "model": model_spec,
            # the schema needs training data; the eval stage never reads it
            "dataset": {"train": ["(not used by evaluate)"]},
            "eval": {k: v for k, v in eval_spec.items() if v is not None},
            "resources": {"device": args.device},
            "monitoring": {"enabled": False},
        },
    }
    try:
        job = PSFTJob.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][2:]) or 'value'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise UserError(f"invalid options: {problems}") from exc
    # benchmark names and files are checked by the stage before any model is loaded
    out = args.out or Path("runs") / f"evaluate-{slug}"
    return StageConfig(
        stage="evaluate",
        kind="eval",
        job=job,
        run_root=str(out),
        target=None,
        progress=not args.no_progress,
    )


def _missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def evaluate(args: argparse.Namespace) -> int:
    from psft.trainer.eval.stage import run

    config = standalone_config(args)
    created = _missing_folders(Path(config.run_root))
    try:
        summary = run(config)
    except BaseException:
        # a refused model or benchmark leaves no empty output folder behind (only folders
        # this call created, and only while nothing was written in them)
        for folder in created:
            inside = list(folder.rglob("*")) if folder.is_dir() else [Path("(a file)")]
            if all(p.is_dir() for p in inside):
                with suppress(OSError):
                    for sub in sorted(inside, key=lambda p: -len(p.parts)):
                        sub.rmdir()
                    folder.rmdir()
        raise
    print(f"{'benchmark':16} {'k':>3} {'Avg@k':>7} {'pass@k':>7} {'maj@k':>7} {'tokens':>7}")
    for r in summary["results"]:
        print(
            f"{r['benchmark']:16} {r['k']:>3} {r['avg_at_k']:>7.3f} {r['pass_at_k']:>7.3f} "
            f"{r['maj_at_k']:>7.3f} {r['mean_response_tokens']:>7.0f}"
        )
    print(f"outputs: {Path(config.run_root) / 'eval'}")
    return 0
