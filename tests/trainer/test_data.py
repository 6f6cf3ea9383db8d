"""Data normalisation, tokenisation, bad rows, truncation, splits, and the prepare stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from psft.trainer.data import collate, percentile, read_examples
from psft.trainer.model import load_tokenizer
from psft.trainer.prepare import prepare
from psft.trainer.storage import LocalRunStore
from psft.workflows import layout
from psft.workflows.cli import main as cli_main
from psft.workflows.errors import UserError
from psft.workflows.spec import SEED_SYSTEM_PROMPT

SEED_ROWS = [
    {
        "id": f"q{i}",
        "prompt": [{"role": "user", "content": f"What is {i} + 3?"}],
        "demonstration": f"We add: {i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}.",
    }
    for i in range(6)
]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def run_prepare(config):
    store = LocalRunStore(Path(config.run_root))
    stats = prepare(config, store)
    train = read_examples(store.local_path(layout.DATA_TRAIN))
    val = read_examples(store.local_path(layout.DATA_VALIDATION))
    return stats, train, val


def test_seed_format_with_eos_and_system_prompt(tmp_path, make_config, tiny_model_dir) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", SEED_ROWS)
    stats, train, val = run_prepare(make_config([path]))
    tok = load_tokenizer(tiny_model_dir)
    assert [e.id for e in train] == [r["id"] for r in SEED_ROWS] and val == []
    e = train[0]
    assert e.prompt[0] == {"role": "system", "content": SEED_SYSTEM_PROMPT}
    assert e.input_ids[-1] == tok.eos_token_id
    assert e.demonstration == SEED_ROWS[0]["demonstration"]
    prompt_text = tok.decode(e.input_ids[: e.response_start])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "What is 0 + 3?" in prompt_text
    assert tok.decode(e.input_ids[e.response_start :]) == e.demonstration + "<|im_end|>"
    assert stats["train"]["rows"] == 6 and stats["train"]["skipped"] == 0
    assert stats["train"]["response_tokens"]["max"] == max(x.response_tokens for x in train)
    on_disk = json.loads((tmp_path / "run" / layout.DATA_STATS).read_text())
    assert on_disk["train"]["rows"] == 6


def test_messages_format_from_parquet(tmp_path, make_config) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
    ]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows * 2), path)
    _, train, _ = run_prepare(make_config([str(path)], psft={"batchSize": 2}))
    assert train[0].demonstration == "6"
    assert [m["content"] for m in train[0].prompt] == ["Be brief.", "2+2?", "4", "and 3+3?"]
    assert train[1].prompt[0]["content"] == SEED_SYSTEM_PROMPT  # none given: the default
    assert train[1].id == "chat-2"


def test_prompt_response_columns(tmp_path, make_config) -> None:
    rows = [{"question": f"Say {i}", "answer": str(i)} for i in range(3)]
    path = write_jsonl(tmp_path / "pr.jsonl", rows)
    config = make_config(
        [path], dataset={"promptKey": "question", "demonstrationKey": "answer", "systemPrompt": ""}
    )
    _, train, _ = run_prepare(config)
    assert train[2].prompt == [{"role": "user", "content": "Say 2"}]
    assert train[2].demonstration == "2"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": [{"role": "user", "content": "x"}]}, "no demonstration column 'demonstration'"),
        ({"prompt": [{"role": "user", "content": "x"}], "demonstration": "  "}, "is empty"),
        ("{not json", "not valid JSON"),
        ({"prompt": [{"role": "wizard", "content": "x"}], "demonstration": "y"}, "role 'wizard'"),
    ],
)
def test_bad_row_error_names_file_and_row(tmp_path, make_config, row, expected) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [*SEED_ROWS[:2], row, *SEED_ROWS[2:]])
    with pytest.raises(UserError) as err:
        run_prepare(make_config([path]))
    assert f"{path}: row 3: " in str(err.value) and expected in str(err.value)


def test_bad_rows_skipped_and_counted(tmp_path, make_config) -> None:
    bad = [{"prompt": [{"role": "user", "content": "x"}]}, "{oops", {"demonstration": "d"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", [*bad, *SEED_ROWS])
    stats, train, _ = run_prepare(make_config([path], dataset={"onBadRow": "skip"}))
    assert len(train) == 6
    assert stats["train"]["skipped"] == 3
    assert stats["train"]["skipped_by_reason"] == {
        "invalid_json": 1,
        "missing_key": 2,  # the file's format is seed (first row): no prompt is a missing key
    }


def test_truncation_modes(tmp_path, make_config, tiny_model_dir) -> None:
    long = {
        "prompt": [{"role": "user", "content": "What is 2 + 3? " * 20}],
        "demonstration": "We add the numbers: 2 + 3 = 5. " * 10,
    }
    path = write_jsonl(tmp_path / "long.jsonl", [long, *SEED_ROWS])
    limits = {"maxPromptLength": 40, "maxResponseLength": 30, "systemPrompt": ""}
    with pytest.raises(UserError, match=r"row 1: too many tokens: prompt \d+ > maxPromptLength 40"):
        run_prepare(make_config([path], dataset=limits))

    tok = load_tokenizer(tiny_model_dir)
    full_prompt = tok.apply_chat_template(
        long["prompt"],
        tokenize=False,
        add_generation_prompt=True,
    )
    full_ids = tok(full_prompt, add_special_tokens=False)["input_ids"]
    for mode in ("left", "right"):
        stats, train, _ = run_prepare(make_config([path], dataset={**limits, "truncation": mode}))
        e = train[0]
        assert e.truncated and stats["train"]["truncated"] == 1
        assert e.prompt_tokens == 40 and e.response_tokens == 30
        expected = full_ids[-40:] if mode == "left" else full_ids[:40]
        assert e.input_ids[:40] == expected
        assert e.input_ids[-1] != tok.eos_token_id  # the end (with EOS) was cut off
        assert not train[1].truncated and train[1].input_ids[-1] == tok.eos_token_id


def test_validation_fraction_and_files(tmp_path, make_config) -> None:
    rows = [{**r, "id": f"r{i}"} for i, r in enumerate(SEED_ROWS * 4)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    stats, train, val = run_prepare(make_config([path], dataset={"validation": {"fraction": 0.25}}))
    assert len(val) == 6 and len(train) == 18
    assert not {e.id for e in train} & {e.id for e in val}
    assert stats["validation"]["rows"] == 6 and stats["train"]["rows"] == 18
    _, _, val_again = run_prepare(make_config([path], dataset={"validation": {"fraction": 0.25}}))
    assert [e.id for e in val_again] == [e.id for e in val]  # seeded

    vpath = write_jsonl(tmp_path / "v.jsonl", SEED_ROWS[:3])
    _, train, val = run_prepare(
        make_config([path], dataset={"validation": {"files": [vpath], "maxRows": 2}, "limit": 5})
    )
    assert len(train) == 5 and [e.id for e in val] == ["q0", "q1"]


def test_batch_larger_than_data_is_a_clear_error(tmp_path, make_config) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", SEED_ROWS[:3])
    with pytest.raises(UserError, match=r"psft.batchSize \(8\) is larger than the 3"):
        run_prepare(make_config([path], psft={"batchSize": 8, "miniBatchSize": 4}))


def test_missing_file_and_unknown_type(tmp_path, make_config) -> None:
    with pytest.raises(UserError, match="does not exist"):
        run_prepare(make_config([str(tmp_path / "missing.jsonl")]))
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(UserError, match="unknown file type"):
        run_prepare(make_config([str(other)]))


def test_collate_aligns_labels_and_masks_prompt_and_padding(tmp_path, make_config) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl", [*SEED_ROWS[:2], {**SEED_ROWS[2], "demonstration": "7"}]
    )
    _, train, _ = run_prepare(make_config([path]))
    batch = collate(train, pad_id=0)
    short = train[2]
    n = len(short.input_ids)
    assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in train)
    assert batch["attention_mask"][2].sum() == n
    mask = batch["loss_mask"][2]
    # label t = token t+1: the mask covers exactly the demonstration tokens (EOS included)
    assert mask.sum() == short.response_tokens
    assert mask[short.response_start - 1] == 1 and mask[short.response_start - 2] == 0
    assert mask[n - 1 :].sum() == 0
    assert batch["labels"][2, short.response_start - 1] == short.input_ids[short.response_start]


def test_prepare_stage_cli_prints_table_and_errors(tmp_path, make_config, capsys) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", SEED_ROWS)
    config_path = tmp_path / "stage.json"
    config_path.write_text(make_config([path]).dump())
    assert cli_main(["prepare", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "prompt p50/p95/max" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    config_path.write_text(make_config([bad]).dump())
    assert cli_main(["prepare", "--config", str(config_path)]) == 2
    assert f"{bad}: row 1: no demonstration column" in capsys.readouterr().err


def test_percentile() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    assert percentile(list(range(101)), 95) == 95
