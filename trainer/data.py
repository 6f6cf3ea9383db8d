"""Training data: read any supported format, normalise, tokenise, and batch.

Every input row becomes one `Example`: an id, the prompt as chat messages, the
demonstration, and its tokens (prompt rendered with the model's chat template, then the
demonstration followed by EOS). The loss covers the demonstration tokens only.

Supported rows (JSONL or Parquet files, local paths or s3:// URIs):
- `seed`: `prompt` is a list of chat messages, `demonstration` is text (the seed's format);
- `messages`: a chat; the last assistant turn is the demonstration, the turns before it
  are the prompt;
- `prompt-response`: plain text in the columns named by promptKey / demonstrationKey.
"""

from __future__ import annotations

import codecs
import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psft.trainer.storage.uri import local_input
from psft.workflows.errors import UserError
from psft.workflows.spec import DatasetSpec

ROLES = ("system", "user", "assistant", "tool")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class BadRow(Exception):
    """A row that cannot become an example; `reason` is a short category for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Example:
    id: str
    prompt: list[dict[str, str]]
    demonstration: str
    input_ids: list[int] = field(default_factory=list)
    response_start: int = 0
    """Index of the first demonstration token in input_ids (= prompt token count)."""
    truncated: bool = False
    source: str = ""
    """file:row it came from (for messages)."""

    @property
    def prompt_tokens(self) -> int:
        return self.response_start

    @property
    def response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start


@dataclass
class SplitStats:
    rows_read: int = 0
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows": self.rows,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "truncated": self.truncated,
            "prompt_tokens": length_summary(self.prompt_lengths),
            "response_tokens": length_summary(self.response_lengths),
            "response_tokens_total": sum(self.response_lengths),
        }


def percentile(values: Sequence[int], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def length_summary(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "p50": 0, "p95": 0, "max": 0, "mean": 0}
    return {
        "min": min(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values),
        "mean": round(sum(values) / len(values), 2),
    }


# reading ------------------------------------------------------------------------------------
def _local(path: str) -> Path:
    if path.startswith("s3://"):
        from psft.trainer.storage import fetch_uri

        return Path(fetch_uri(path))
    local = local_input(path)
    if local.is_dir():
        raise UserError(
            f"dataset file {path} is a folder, not a file (dataset.train / validation.files); "
            "name the JSONL or Parquet files in it"
        )
    if not local.is_file():
        raise UserError(f"dataset file {path} does not exist (dataset.train / validation.files)")
    return local


def _text_problem(path: str, head: bytes) -> str | None:
    """Why a JSONL file is not UTF-8 text at all, judged from its first bytes, or None."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "is UTF-16 text; save it as UTF-8 (JSON Lines are UTF-8)"
    if head.startswith((b"PAR1", b"PK\x03\x04", b"\x1f\x8b")):
        return (
            "is a binary file (Parquet, zip or gzip), not JSON Lines: give Parquet files a "
            ".parquet name, and unpack compressed ones"
        )
    return None


def _jsonl_rows(path: str, local: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with local.open("rb") as f:
        problem = _text_problem(path, f.read(4))
        if problem:
            raise UserError(f"{path} {problem}")
        f.seek(0)
        for i, raw in enumerate(f, start=1):
            if i == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    i,
                    BadRow(
                        "not_utf8",
                        f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "save the file as UTF-8",
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield i, BadRow("invalid_json", f"not valid JSON ({exc.msg})")
                continue
            except RecursionError:
                yield i, BadRow("invalid_json", "not valid JSON (nested too deep)")
                continue
            if not isinstance(row, dict):
                yield i, BadRow("invalid_json", "a JSON object per line is expected")
                continue
            yield i, row


def iter_rows(path: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """(1-based row number, row or BadRow) for every row of a JSONL or Parquet file."""
    local = _local(path)
    name = local.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(local)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise UserError(
                f"{path}: not a readable Parquet file ({' '.join(str(exc).split())}); is this "
                "the right file? Write it again as Parquet, or give JSON Lines (.jsonl)"
            ) from exc
        yield from enumerate(table.to_pylist(), start=1)
        return
    if not name.endswith(JSONL_SUFFIXES):
        raise UserError(
            f"{path}: unknown file type; use JSONL ({', '.join(JSONL_SUFFIXES)}) "
            f"or Parquet ({', '.join(PARQUET_SUFFIXES)})"
        )
    yield from _jsonl_rows(path, local)


def detect_format(row: dict[str, Any], spec: DatasetSpec) -> str:
    if spec.format != "auto":
        return spec.format
    prompt = row.get(spec.prompt_key)
    if prompt is None and isinstance(row.get(spec.messages_key), list):
        return "messages"
    if isinstance(prompt, list):
        return "seed"
    if isinstance(prompt, str):
        return "prompt-response"
    raise BadRow(
        "unknown_format",
        f"cannot tell the row format: no {spec.prompt_key!r} (text or chat messages) and no "
        f"{spec.messages_key!r} column; set dataset.format, dataset.promptKey or "
        "dataset.messagesKey",
    )


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRow("bad_messages", f"{key!r} must be a non-empty list of chat messages")
    out = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise BadRow("bad_messages", f"{key}[{j}] must have 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise BadRow("bad_messages", f"{key}[{j}].role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise BadRow("bad_messages", f"{key}[{j}].content must be text")
        out.append({"role": role, "content": content})
    return out


def _text(row: dict[str, Any], key: str, what: str) -> str:
    if key not in row or row[key] is None:
        raise BadRow("missing_key", f"no {what} column {key!r} (columns: {', '.join(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow("bad_type", f"{key!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty", f"{key!r} is empty")
    return value


def normalise_row(row: dict[str, Any], spec: DatasetSpec, fmt: str) -> tuple[list, str]:
    """(prompt messages, demonstration) of one raw row, in the given format."""
    if fmt == "messages":
        if spec.messages_key not in row:
            raise BadRow("missing_key", f"no messages column {spec.messages_key!r}")
        chat = _messages(row[spec.messages_key], spec.messages_key)
        last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=None)
        if last is None:
            raise BadRow("no_assistant_turn", f"{spec.messages_key!r} has no assistant turn")
        demonstration = chat[last]["content"]
        if not demonstration.strip():
            raise BadRow("empty", "the last assistant turn is empty")
        prompt = chat[:last]
        if not prompt:
            raise BadRow("empty", "no turns before the last assistant turn (empty prompt)")
        return prompt, demonstration
    demonstration = _text(row, spec.demonstration_key, "demonstration")
    if fmt == "seed":
        if spec.prompt_key not in row or row[spec.prompt_key] is None:
            raise BadRow("missing_key", f"no prompt column {spec.prompt_key!r}")
        return _messages(row[spec.prompt_key], spec.prompt_key), demonstration
    prompt_value = row.get(spec.prompt_key)
    if isinstance(prompt_value, list):  # tolerate chat prompts in prompt-response files
        return _messages(prompt_value, spec.prompt_key), demonstration
    return [{"role": "user", "content": _text(row, spec.prompt_key, "prompt")}], demonstration


def check_unicode(prompt: list[dict[str, str]], demonstration: str) -> None:
    """Text a tokenizer can encode: JSON's `\\ud800` escapes decode to lone surrogates."""
    for text in [*(m["content"] for m in prompt), demonstration]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRow(
                "invalid_text",
                f"holds {text[exc.start : exc.end]!r}, half of a surrogate pair (an escape "
                "such as \\ud800 without its partner), which is no character; fix or drop it",
            ) from None


def with_system_prompt(prompt: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if not system or any(m["role"] == "system" for m in prompt):
        return prompt
    return [{"role": "system", "content": system}, *prompt]


# tokenising ---------------------------------------------------------------------------------
class Tokenise:
    """Chat template + EOS + truncation, with the dataset spec's budgets."""

    def __init__(self, tokenizer: Any, spec: DatasetSpec) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the model's tokenizer has no chat template; set model.chatTemplate "
                "(a Jinja template) in the PSFTJob"
            )
        self.tokenizer = tokenizer
        self.spec = spec
        self.eos = tokenizer.eos_token_id

    def __call__(self, example: Example) -> Example:
        tok, spec = self.tokenizer, self.spec
        text = tok.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = list(tok(text, add_special_tokens=False)["input_ids"])
        response_ids = list(tok(example.demonstration, add_special_tokens=False)["input_ids"])
        response_ids.append(self.eos)
        over_p = len(prompt_ids) - spec.max_prompt_length
        over_r = len(response_ids) - spec.max_response_length
        if over_p > 0 or over_r > 0:
            if spec.truncation == "error":
                parts = []
                if over_p > 0:
                    parts.append(
                        f"prompt {len(prompt_ids)} > maxPromptLength {spec.max_prompt_length}"
                    )
                if over_r > 0:
                    parts.append(
                        f"demonstration {len(response_ids)} (EOS included) > maxResponseLength "
                        f"{spec.max_response_length}"
                    )
                raise BadRow(
                    "too_long",
                    "too many tokens: " + ", ".join(parts) + "; raise the limits, set "
                    "dataset.truncation to left/right, or dataset.onBadRow: skip",
                )
            if over_p > 0:
                keep = spec.max_prompt_length
                prompt_ids = prompt_ids[-keep:] if spec.truncation == "left" else prompt_ids[:keep]
            if over_r > 0:
                response_ids = response_ids[: spec.max_response_length]
            example.truncated = True
        example.input_ids = prompt_ids + response_ids
        example.response_start = len(prompt_ids)
        return example


# a whole split --------------------------------------------------------------------------------
def load_examples(
    files: Sequence[str],
    spec: DatasetSpec,
    tokenise: Tokenise,
    stats: SplitStats,
    limit: int | None = None,
) -> list[Example]:
    """Read, normalise and tokenise `files`; bad rows raise or are counted (onBadRow)."""
    examples: list[Example] = []
    for path in files:
        fmt: str | None = None
        read_before = stats.rows_read
        for row_no, row in iter_rows(path):
            if limit is not None and len(examples) >= limit:
                return examples
            stats.rows_read += 1
            where = f"{path}: row {row_no}"
            try:
                if isinstance(row, BadRow):
                    raise row
                fmt = fmt or detect_format(row, spec)
                prompt, demonstration = normalise_row(row, spec, fmt)
                check_unicode(prompt, demonstration)
                prompt = with_system_prompt(prompt, spec.system_prompt)
                raw_id = row.get("id")
                example = Example(
                    id=str(raw_id) if raw_id not in (None, "") else f"{Path(path).stem}-{row_no}",
                    prompt=prompt,
                    demonstration=demonstration,
                    source=f"{path}:{row_no}",
                )
                tokenise(example)
            except BadRow as bad:
                if spec.on_bad_row == "error":
                    raise UserError(
                        f"{where}: {bad.detail} (dataset.onBadRow: skip drops such rows)"
                    ) from None
                stats.skipped[bad.reason] += 1
                continue
            stats.rows += 1
            stats.truncated += int(example.truncated)
            stats.prompt_lengths.append(example.prompt_tokens)
            stats.response_lengths.append(example.response_tokens)
            examples.append(example)
        if stats.rows_read == read_before:
            raise UserError(
                f"dataset file {path} holds no rows (it is empty or blank); fill it, or "
                "remove it from dataset.train / validation.files"
            )
    return examples


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples (at least 1 when fraction > 0), seeded."""
    if fraction <= 0 or not examples:
        return examples, []
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise UserError(
            f"dataset.validation.fraction {fraction} of {len(examples)} rows leaves no training "
            "rows; lower the fraction or add data"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


# Parquet ------------------------------------------------------------------------------------
def _schema():
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.list_(message)),
            ("demonstration", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("response_start", pa.int32()),
            ("truncated", pa.bool_()),
            ("source", pa.string()),
        ]
    )


def write_examples(examples: Sequence[Example], path: Path) -> None:
    """The normalised Parquet file every later stage reads (schema in `_schema`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {name: [] for name in _schema().names}
    for e in examples:
        columns["id"].append(e.id)
        columns["prompt"].append(e.prompt)
        columns["demonstration"].append(e.demonstration)
        columns["input_ids"].append(e.input_ids)
        columns["response_start"].append(e.response_start)
        columns["truncated"].append(e.truncated)
        columns["source"].append(e.source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(pa.table(columns, schema=_schema()), tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise


PREPARED_FIX = (
    "run the prepare stage again (`psft run --fresh`, or `psft prepare` with this job's stage "
    "config)"
)


def read_examples(path: Path, *, allow_empty: bool = True) -> list[Example]:
    """The rows of a prepared Parquet file (write_examples), each checked: a damaged or
    foreign file is a UserError naming the file, the row and what to do."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise UserError(
            f"{path}: not a prepared data file ({' '.join(str(exc).split())}); {PREPARED_FIX}"
        ) from exc
    schema = _schema()
    missing = set(schema.names) - set(table.column_names)
    if missing:
        raise UserError(f"{path}: missing columns {sorted(missing)}; {PREPARED_FIX}")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise UserError(
            f"{path}: columns of the wrong type, not what prepare writes "
            f"({' '.join(str(exc).split())}); {PREPARED_FIX}"
        ) from exc
    if not allow_empty and table.num_rows == 0:
        raise UserError(f"{path} holds no rows; {PREPARED_FIX}")

    def first(mask: Any) -> int | None:
        index = pc.index(mask.fill_null(True), True).as_py()
        return None if index is None or index < 0 else index

    for name in ("id", "prompt", "demonstration", "input_ids", "response_start"):
        column = table.column(name)
        if column.null_count:
            row = first(pc.is_null(column))
            raise UserError(f"{path}: row {(row or 0) + 1} has no {name}; {PREPARED_FIX}")
    ids = table.column("input_ids")
    lengths = pc.list_value_length(ids)
    starts = table.column("response_start")
    no_response = pc.or_(pc.less(starts, 0), pc.greater_equal(starts, lengths))
    row = first(no_response)
    if row is not None:
        raise UserError(
            f"{path}: row {row + 1} has {lengths[row].as_py()} token ids and response_start "
            f"{starts[row].as_py()}: no demonstration tokens to train on; {PREPARED_FIX}"
        )
    examples = [Example(**r) for r in table.to_pylist()]
    for i, e in enumerate(examples, start=1):
        if None in e.input_ids or min(e.input_ids) < 0:
            raise UserError(
                f"{path}: row {i} (id {e.id!r}) has a token id that is missing or negative; "
                f"{PREPARED_FIX}"
            )
    return examples


def check_token_ids(examples: Sequence[Example], vocabulary: int, path: Path) -> None:
    """Every token id of the prepared rows is in the model's vocabulary (UserError if not)."""
    for i, e in enumerate(examples, start=1):
        top = max(e.input_ids, default=0)
        if top >= vocabulary:
            raise UserError(
                f"{path}: row {i} (id {e.id!r}) has token id {top}, but the model's vocabulary "
                f"has {vocabulary} entries: the data was prepared with another tokenizer; "
                f"{PREPARED_FIX} with this model"
            )


# batching -----------------------------------------------------------------------------------
def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors for a causal LM, aligned for next-token prediction.

    input_ids/attention_mask are [B, L]; `labels` and `loss_mask` are [B, L-1]: position t
    of the logits predicts labels[t] = input_ids[t+1], and loss_mask is 1 exactly where that
    label is a demonstration token (prompt and padding excluded).
    """
    import torch

    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    response = torch.zeros((len(examples), length), dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention[i, :n] = 1
        response[i, e.response_start : n] = 1.0
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": ids[:, 1:].clone(),
        "loss_mask": response[:, 1:].clone(),
    }
