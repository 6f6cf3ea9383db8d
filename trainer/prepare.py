"""The prepare stage: training data -> data/train.parquet, data/validation.parquet, stats.

`psft prepare --config stage.json`. Reads dataset.train (and validation files), normalises
and tokenises every row with the model's tokenizer and chat template, reports token-length
statistics, and publishes the files through the run's storage.
"""

from __future__ import annotations

import json
import time
from typing import Any

from psft.trainer.data import (
    SplitStats,
    Tokenise,
    load_examples,
    split_validation,
    write_examples,
)
from psft.workflows import layout
from psft.workflows.errors import UserError
from psft.workflows.stages import StageConfig


def prepare(config: StageConfig, store: Any) -> dict[str, Any]:
    """Write the prepared splits and stats into `store`; returns the stats dict."""
    from psft.trainer.model import check_model_folder, load_tokenizer, resolve_model

    job = config.job
    spec = job.spec.dataset
    started = time.monotonic()
    model_dir = resolve_model(job.spec.model.source)
    # the whole folder, weights' headers included: a damaged model fails here, not in training
    check_model_folder(model_dir)
    tokenizer = load_tokenizer(
        model_dir,
        chat_template=job.spec.model.chat_template,
        trust_remote_code=job.spec.model.trust_remote_code,
    )
    tokenise = Tokenise(tokenizer, spec)

    train_stats, val_stats = SplitStats(), SplitStats()
    train = load_examples(spec.train, spec, tokenise, train_stats, limit=spec.limit)
    if spec.validation.files:
        val = load_examples(spec.validation.files, spec, tokenise, val_stats)
    else:
        train, val = split_validation(train, spec.validation.fraction, job.spec.psft.seed)
        # rows held out of the training file count in validation, not in train
        train_stats = _restat(train, train_stats)
        val_stats = _restat(val, SplitStats(rows_read=len(val)))
    if spec.validation.max_rows is not None:
        val = val[: spec.validation.max_rows]
        val_stats = _restat(val, val_stats)
    if not train:
        skipped = sum(train_stats.skipped.values())
        raise UserError(
            f"no training rows left from {', '.join(spec.train)} "
            f"({train_stats.rows_read} read, {skipped} skipped: {dict(train_stats.skipped)}); "
            "check dataset.promptKey/demonstrationKey and the token limits"
        )
    psft = job.spec.psft
    if len(train) < psft.batch_size:
        raise UserError(
            f"psft.batchSize ({psft.batch_size}) is larger than the {len(train)} training rows; "
            "lower psft.batchSize or add data"
        )

    write_examples(train, store.local_path(layout.DATA_TRAIN))
    store.push(layout.DATA_TRAIN)
    write_examples(val, store.local_path(layout.DATA_VALIDATION))
    store.push(layout.DATA_VALIDATION)
    stats = {
        "model": job.spec.model.source,
        "files": {"train": list(spec.train), "validation": list(spec.validation.files)},
        "truncation": spec.truncation,
        "on_bad_row": spec.on_bad_row,
        "max_prompt_length": spec.max_prompt_length,
        "max_response_length": spec.max_response_length,
        "eos_token": tokenizer.eos_token,
        "train": train_stats.to_dict(),
        "validation": val_stats.to_dict(),
        "seconds": round(time.monotonic() - started, 2),
    }
    stats_path = store.local_path(layout.DATA_STATS)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    store.push(layout.DATA_STATS)
    return stats


def _restat(examples: list, base: SplitStats) -> SplitStats:
    out = SplitStats(rows_read=base.rows_read, skipped=base.skipped)
    for e in examples:
        out.rows += 1
        out.truncated += int(e.truncated)
        out.prompt_lengths.append(e.prompt_tokens)
        out.response_lengths.append(e.response_tokens)
    return out


def format_table(stats: dict[str, Any]) -> str:
    """A short plain-text table of the splits (printed by the stage)."""
    head = f"{'split':<11}{'rows':>7}{'skipped':>9}{'truncated':>11}"
    head += f"{'prompt p50/p95/max':>22}{'response p50/p95/max':>24}"
    lines = [head]
    for split in ("train", "validation"):
        s = stats[split]
        p, r = s["prompt_tokens"], s["response_tokens"]
        lines.append(
            f"{split:<11}{s['rows']:>7}{s['skipped']:>9}{s['truncated']:>11}"
            f"{'{:.0f}/{:.0f}/{:.0f}'.format(p['p50'], p['p95'], p['max']):>22}"
            f"{'{:.0f}/{:.0f}/{:.0f}'.format(r['p50'], r['p95'], r['max']):>24}"
        )
    reasons = {**stats["train"]["skipped_by_reason"]}
    for k, v in stats["validation"]["skipped_by_reason"].items():
        reasons[k] = reasons.get(k, 0) + v
    if reasons:
        lines.append("skipped rows: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    return "\n".join(lines)


def run(config: StageConfig) -> None:
    from psft.trainer.storage import open_run_store
    from psft.trainer.storage.base import disk_full_is_an_error

    store = open_run_store(config)
    with disk_full_is_an_error(
        store.work_dir,
        "writing the prepared data",
        "free space there (or give the run a larger volume) and run the stage again",
    ):
        stats = prepare(config, store)
    print(format_table(stats))
    print(f"prepared data: {store.root}/{layout.DATA_TRAIN}, {layout.DATA_VALIDATION}, ", end="")
    print(layout.DATA_STATS, flush=True)
