"""Corrupt stage inputs (issue 11, class 5): one paragraph, exit code 2, nothing lost.

Every case copies one small finished run (the tiny model, prepared data, two resumable
checkpoints, an evaluation and a report, built once per module), damages one input, and runs
one stage through the real command line (`psft <stage> --config stage.json`, in-process).
Each must end with exit code 2 and one paragraph on stderr naming the damaged file (no
traceback); nothing outside the run folder may change, no file the run already held may be
lost or altered, and a `latest` checkpoint marker the stage moved must name a complete
checkpoint. The last test fills the disk under a training run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from psft.workflows.cli import main

# the run ---------------------------------------------------------------------------------------

ROWS = [
    {
        "id": f"q{i}",
        "prompt": [{"role": "user", "content": f"What is {i} + 3?"}],
        "demonstration": f"We add: {i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}.",
    }
    for i in range(16)
]
CHECKPOINT_FILES = (
    "trainer_state.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "model.safetensors",
    "config.json",
    "tokenizer.json",
)


def job_wire(root: Path) -> dict[str, Any]:
    return {
        "apiVersion": "psft.dev/v1alpha1",
        "kind": "PSFTJob",
        "metadata": {"name": "corrupt"},
        "spec": {
            "model": {"source": str(root / "model")},
            "dataset": {
                "train": [str(root / "data" / "train.jsonl")],
                "validation": {"fraction": 0.25},
                "maxPromptLength": 128,
                "maxResponseLength": 128,
            },
            "psft": {
                "batchSize": 4,
                "miniBatchSize": 2,
                "microBatchSize": 1,
                "maxSteps": 2,
                "saveEvery": 1,
                "keepCheckpoints": 2,
                "warmupSteps": 0,
                "learningRate": 1e-3,
            },
            "eval": {
                "benchmarks": [{"name": "sums", "path": str(root / "bench.jsonl")}],
                "samples": 1,
                "maxTokens": 4,
                "backend": "transformers",
                "checkpoints": "final",
            },
            "grpo": {
                "enabled": True,
                "prompts": [str(root / "prompts.jsonl")],
                "rollout": "trl",
                "rolloutN": 2,
                "batchSize": 2,
                "miniBatchSize": 1,
                "steps": 1,
                "maxResponseLength": 4,
            },
            "resources": {"device": "cpu"},
            "monitoring": {"enabled": False},
        },
    }


def stage_config(root: Path, kind: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "stage": kind,
        "kind": kind,
        "job": job_wire(root),
        "runRoot": str(root / "run"),
        "progress": False,
    }
    if kind == "eval":
        config["target"] = "train"
    return config


def write_config(root: Path, kind: str, config: dict[str, Any] | None = None) -> Path:
    path = root / f"{kind}.json"
    path.write_text(json.dumps(config or stage_config(root, kind), indent=2))
    return path


@pytest.fixture(scope="module")
def base_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: prepare, train (checkpoints step-1 and step-2), eval, report."""
    root = tmp_path_factory.mktemp("corrupt-base")
    shutil.copytree(tiny_model_dir, root / "model")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "bench.jsonl").write_text(json.dumps({"problem": "What is 4 + 3?", "answer": "7"}))
    (root / "prompts.jsonl").write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}))
    for kind in ("prepare", "train", "eval", "report"):
        assert main([kind, "--config", str(write_config(root, kind))]) == 0, kind
    for name in CHECKPOINT_FILES:
        assert (root / "run/train/checkpoints/step-2" / name).is_file(), name
    for kind in ("prepare", "train", "eval", "report"):
        (root / f"{kind}.json").unlink()
    return root


# one case --------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """The copy of the run a case damages."""

    root: Path
    stage: str
    config: dict[str, Any]
    config_path: Path
    raw: bytes | None = None
    """Written as the stage config instead of `config` when set."""
    write: bool = True
    """False: config_path is left as the damage made it (missing, a folder)."""

    @property
    def spec(self) -> dict[str, Any]:
        return self.config["job"]["spec"]

    def p(self, rel: str) -> Path:
        return self.root / rel


@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    damage: Callable[[Ctx], None]
    names: str
    """Part of the damaged file's path the message must show."""
    says: tuple[str, ...] = field(default=())
    """Words the message must hold besides the path (lower case)."""


CK = "run/train/checkpoints/step-2"
FINAL = "run/train/final"
PARQUET = "run/data/train.parquet"
METRICS = "run/train/metrics.jsonl"
EVAL_SUMMARY = "run/eval/summary.json"


def put(rel: str, data: bytes | str) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        path = c.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return damage


def rm(*rels: str) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        for rel in rels:
            path = c.p(rel)
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


def truncate(rel: str, keep: float = 0.5) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        path = c.p(rel)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return damage


def both(*steps: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        for step in steps:
            step(c)

    return damage


def fresh(c: Ctx) -> None:
    """No checkpoint: the train stage starts from model.source and the prepared data."""
    shutil.rmtree(c.p("run/train"))


def spec_edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        fn(c.spec)

    return damage


def config_edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        fn(c.config)

    return damage


def config_at(c: Ctx, path: Path) -> None:
    c.config_path, c.write = path, False


def raw_config(data: bytes) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        c.raw = data

    return damage


def json_edit(rel: str, fn: Callable[[Any], Any]) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        path = c.p(rel)
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))

    return damage


def parquet_rows(fn: Callable[[list[dict[str, Any]]], None], rel: str = PARQUET, schema=None):
    def damage(c: Ctx) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from psft.trainer.data import _schema

        rows = pq.read_table(c.p(rel)).to_pylist()
        fn(rows)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema or _schema()), c.p(rel))

    return damage


def set_row(index: int, **values: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(rows: list[dict[str, Any]]) -> None:
        rows[index].update(values)

    return edit


def parquet_table(fn: Callable[[Any], Any], rel: str = PARQUET) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        import pyarrow.parquet as pq

        pq.write_table(fn(pq.read_table(c.p(rel))), c.p(rel))

    return damage


def ids_as_text(table: Any) -> Any:
    import pyarrow as pa

    index = table.column_names.index("input_ids")
    return table.set_column(index, "input_ids", pa.array([["a", "b"]] * table.num_rows))


def torch_save(rel: str, obj: Any) -> Callable[[Ctx], None]:
    def damage(c: Ctx) -> None:
        import torch

        torch.save(obj, c.p(rel))

    return damage


def data_lines(*lines: bytes) -> Callable[[Ctx], None]:
    return put("data/train.jsonl", b"".join(line + b"\n" for line in lines))


GOOD = json.dumps(ROWS[0]).encode()
GARBAGE = b"\x00\x9fgarbage\xff\xfe not what this file should hold\n"


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        for key in path[:-1]:
            d = d.setdefault(key, {})
        d[path[-1]] = value

    return edit


def _set_model_config(**values: Any) -> Callable[[Any], Any]:
    return lambda cfg: {**cfg, **values}


CASES = [
    # stage.json ------------------------------------------------------------------------------
    Case("stage-json-missing", "train", lambda c: config_at(c, c.p("nope.json")),
         "nope.json", ("no such file",)),
    Case("stage-json-folder", "train", lambda c: config_at(c, c.p("data")), "data",
         ("folder",)),
    Case("stage-json-empty", "train", raw_config(b""), "train.json"),
    Case("stage-json-not-json", "prepare", raw_config(b"stage: train\nkind: [\n"), "prepare.json",
         ("json",)),
    Case("stage-json-truncated", "train",
         lambda c: setattr(c, "raw", json.dumps(c.config).encode()[:300]), "train.json"),
    Case("stage-json-not-utf8", "eval", raw_config(b'{"stage": "eval\xff\xfe"}'), "eval.json",
         ("utf-8",)),
    Case("stage-json-binary", "report", raw_config(b"\x00\x01\x02PK\x03\x04"), "report.json"),
    Case("stage-json-array", "train", raw_config(b"[1, 2, 3]"), "train.json"),
    Case("stage-json-unknown-key", "train", config_edit(_set(("colour",), "blue")), "train.json",
         ("colour",)),
    Case("stage-json-unknown-spec-key", "prepare",
         spec_edit(_set(("psft", "learningRat"), 0.1)), "prepare.json", ("learningrat",)),
    Case("stage-json-wrong-type", "train", spec_edit(_set(("psft", "batchSize"), "four")),
         "train.json", ("batchsize",)),
    Case("stage-json-wrong-kind", "train", config_edit(_set(("kind",), 5)), "train.json"),
    Case("stage-json-no-job", "grpo", config_edit(lambda d: d.pop("job")), "grpo.json",
         ("job",)),
    Case("stage-json-runroot-list", "report", config_edit(_set(("runRoot",), ["a"])),
         "report.json", ("runroot",)),
    Case("stage-json-duplicate-key", "train",
         lambda c: setattr(c, "raw", b'{"stage": "train", "stage": "x"}'), "train.json",
         ("twice",)),
    Case("stage-json-too-deep", "train", raw_config(b"[" * 5000 + b"]" * 5000), "train.json"),
    Case("stage-json-negative-steps", "train", spec_edit(_set(("psft", "maxSteps"), -3)),
         "train.json", ("maxsteps",)),
    Case("stage-json-minibatch-divides", "train",
         spec_edit(_set(("psft", "miniBatchSize"), 3)), "train.json",
         ("minibatchsize", "must divide")),
    Case("stage-json-microbatch-above-mini", "prepare",
         spec_edit(_set(("psft", "microBatchSize"), 4)), "prepare.json", ("microbatchsize",)),
    Case("stage-json-grpo-without-prompts", "grpo",
         spec_edit(_set(("grpo", "prompts"), [])), "grpo.json", ("spec.grpo.prompts",)),
    Case("stage-json-context-length", "prepare",
         spec_edit(_set(("dataset", "maxResponseLength"), 4000)), "prepare.json",
         ("context length",)),
    Case("stage-json-unknown-benchmark", "eval",
         spec_edit(_set(("eval", "benchmarks"), ["no-such-bench"])), "eval.json",
         ("no-such-bench",)),
    # valid since multi-node training landed, but outside a Ray cluster: the field and the fix
    Case("stage-json-multi-node", "train", spec_edit(_set(("resources", "nodes"), 2)),
         "spec.resources.nodes", ("multi-node", "ray cluster")),
    Case("stage-json-home-of-no-user", "train",
         spec_edit(_set(("storage", "local", "path"), "~no-such-user-here/runs")), "train.json",
         ("no-such-user-here",)),
    Case("stage-json-kind-mismatch", "train",
         lambda c: c.config.update(stage_config(c.root, "prepare")), "train.json"),
    Case("stage-json-bad-base64", "train",
         lambda c: setattr(c, "config_path", c.p("train.json.b64")) or setattr(c, "raw", b"@@"),
         "train.json.b64", ("base64",)),
    # training JSONL and Parquet inputs (prepare) ---------------------------------------------
    Case("data-not-utf8", "prepare", data_lines(GOOD, b'{"prompt": "caf\xe9"}'),
         "data/train.jsonl", ("utf-8", "row 2")),
    Case("data-utf16", "prepare", put("data/train.jsonl", GOOD.decode().encode("utf-16")),
         "data/train.jsonl"),
    Case("data-nul-bytes", "prepare", data_lines(GOOD, b"\x00\x00\x00\x00"), "data/train.jsonl"),
    Case("data-broken-json-line", "prepare", data_lines(GOOD, b'{"prompt": [1, 2'),
         "data/train.jsonl", ("row 2",)),
    Case("data-demonstration-number", "prepare",
         data_lines(GOOD, json.dumps({**ROWS[1], "demonstration": 5}).encode()),
         "data/train.jsonl", ("row 2",)),
    Case("data-prompt-number", "prepare",
         data_lines(json.dumps({**ROWS[1], "prompt": 42}).encode()), "data/train.jsonl"),
    Case("data-message-role", "prepare",
         data_lines(json.dumps({**ROWS[1], "prompt": [{"role": "boss", "content": "x"}]}).encode()),
         "data/train.jsonl", ("role",)),
    Case("data-line-is-array", "prepare", data_lines(GOOD, b"[1, 2, 3]"), "data/train.jsonl"),
    Case("data-empty-file", "prepare", put("data/train.jsonl", b""), "data/train.jsonl",
         ("empty",)),
    Case("data-blank-lines-only", "prepare", put("data/train.jsonl", b"\n   \n\n"),
         "data/train.jsonl"),
    Case("data-too-deep", "prepare", data_lines(GOOD, b"[" * 100_000 + b"]" * 100_000),
         "data/train.jsonl", ("row 2",)),
    Case("data-lone-surrogate", "prepare",
         data_lines(json.dumps({**ROWS[1], "demonstration": "x \ud800 y"}).encode()),
         "data/train.jsonl", ("row 1",)),
    Case("data-missing-file", "prepare", rm("data/train.jsonl"), "data/train.jsonl"),
    Case("data-is-a-folder", "prepare", both(rm("data/train.jsonl"),
         lambda c: c.p("data/train.jsonl").mkdir()), "data/train.jsonl"),
    Case("data-unknown-extension", "prepare",
         both(put("data/train.txt", GOOD), lambda c: c.spec["dataset"].update(
             train=[str(c.p("data/train.txt"))])), "data/train.txt", ("unknown file type",)),
    Case("data-garbage-parquet", "prepare",
         both(put("data/train.parquet", GARBAGE),
              spec_edit(lambda s: s["dataset"].update(train=[s["dataset"]["train"][0].replace(
                  ".jsonl", ".parquet")]))),
         "data/train.parquet", ("parquet",)),
    Case("data-validation-not-utf8", "prepare",
         both(put("data/val.jsonl", b'{"id": "\xff"}\n'),
              lambda c: c.spec["dataset"].update(
                  validation={"files": [str(c.p("data/val.jsonl"))]})),
         "data/val.jsonl", ("utf-8",)),
    Case("data-all-rows-skipped", "prepare",
         both(data_lines(b"{}", b'{"prompt": 1}'),
              spec_edit(_set(("dataset", "onBadRow"), "skip"))),
         "data/train.jsonl", ("no training rows",)),
    # model folders -----------------------------------------------------------------------------
    Case("model-config-not-json", "prepare", put("model/config.json", "{model_type: llama"),
         "model/config.json", ("json",)),
    Case("model-config-empty", "train", both(fresh, put("model/config.json", "")),
         "model/config.json"),
    Case("model-config-list", "train", both(fresh, put("model/config.json", "[1, 2]")),
         "model/config.json"),
    Case("model-config-not-utf8", "train", both(fresh, put("model/config.json", GARBAGE)),
         "model/config.json"),
    Case("model-config-no-model-type", "train",
         both(fresh, json_edit("model/config.json",
                               lambda d: {k: v for k, v in d.items() if k != "model_type"})),
         "model/config.json", ("model_type",)),
    Case("model-config-unknown-type", "train",
         both(fresh, json_edit("model/config.json", _set_model_config(model_type="wizard"))),
         "model/config.json", ("wizard",)),
    Case("model-config-wrong-shapes", "train",
         both(fresh, json_edit("model/config.json", _set_model_config(hidden_size=64))),
         "model"),
    Case("model-config-wrong-field-type", "train",
         both(fresh, json_edit("model/config.json", _set_model_config(num_hidden_layers="two"))),
         "model/config.json"),
    Case("model-weights-missing", "train", both(fresh, rm("model/model.safetensors")),
         "model", ("weights",)),
    Case("model-weights-truncated", "train", both(fresh, truncate("model/model.safetensors")),
         "model/model.safetensors", ("truncated",)),
    Case("model-weights-garbage", "train", both(fresh, put("model/model.safetensors", GARBAGE)),
         "model/model.safetensors"),
    Case("model-weights-empty", "prepare", put("model/model.safetensors", b""),
         "model/model.safetensors"),
    Case("model-weights-header-only", "train",
         both(fresh, truncate("model/model.safetensors", 0.001)), "model/model.safetensors"),
    Case("model-shard-missing", "train",
         both(fresh, rm("model/model.safetensors"), put("model/model.safetensors.index.json",
                         json.dumps({"weight_map": {"x.weight": "model-00002.safetensors"}}))),
         "model/model-00002.safetensors", ("missing",)),
    Case("model-tokenizer-missing", "prepare",
         rm("model/tokenizer.json", "model/tokenizer_config.json"), "model", ("tokenizer",)),
    Case("model-tokenizer-json-garbage", "prepare", put("model/tokenizer.json", GARBAGE),
         "model/tokenizer.json"),
    Case("model-tokenizer-json-truncated", "train", both(fresh, truncate("model/tokenizer.json")),
         "model/tokenizer.json"),
    Case("model-tokenizer-config-garbage", "prepare",
         put("model/tokenizer_config.json", "{not json"), "model/tokenizer_config.json"),
    Case("model-config-missing", "prepare", rm("model/config.json"), "model", ("config.json",)),
    # resumable checkpoints (the train stage resumes from step-2) -------------------------------
    Case("ckpt-trainer-state-missing", "train", rm(f"{CK}/trainer_state.json"),
         f"{CK}/trainer_state.json", ("step-1",)),
    Case("ckpt-trainer-state-garbage", "train", put(f"{CK}/trainer_state.json", GARBAGE),
         f"{CK}/trainer_state.json"),
    Case("ckpt-trainer-state-empty", "train", put(f"{CK}/trainer_state.json", ""),
         f"{CK}/trainer_state.json"),
    Case("ckpt-trainer-state-wrong-types", "train",
         json_edit(f"{CK}/trainer_state.json", lambda d: {**d, "step": "two"}),
         f"{CK}/trainer_state.json", ("step",)),
    Case("ckpt-trainer-state-unknown-keys", "train",
         json_edit(f"{CK}/trainer_state.json", lambda d: {**d, "steps_done": 2}),
         f"{CK}/trainer_state.json", ("steps_done",)),
    Case("ckpt-trainer-state-other-step", "train",
         json_edit(f"{CK}/trainer_state.json", lambda d: {**d, "step": 5}),
         f"{CK}/trainer_state.json", ("step 5",)),
    Case("ckpt-trainer-state-list", "train", put(f"{CK}/trainer_state.json", "[2]"),
         f"{CK}/trainer_state.json"),
    Case("ckpt-optimizer-missing", "train", rm(f"{CK}/optimizer.pt"), f"{CK}/optimizer.pt"),
    Case("ckpt-optimizer-garbage", "train", put(f"{CK}/optimizer.pt", GARBAGE),
         f"{CK}/optimizer.pt"),
    Case("ckpt-optimizer-truncated", "train", truncate(f"{CK}/optimizer.pt"),
         f"{CK}/optimizer.pt"),
    Case("ckpt-optimizer-of-another-model", "train",
         torch_save(f"{CK}/optimizer.pt", {"state": {}, "param_groups": []}),
         f"{CK}/optimizer.pt"),
    Case("ckpt-scheduler-garbage", "train", put(f"{CK}/scheduler.pt", GARBAGE),
         f"{CK}/scheduler.pt"),
    Case("ckpt-scheduler-missing", "train", rm(f"{CK}/scheduler.pt"), f"{CK}/scheduler.pt"),
    Case("ckpt-rng-missing", "train", rm(f"{CK}/rng.pt"), f"{CK}/rng.pt"),
    Case("ckpt-rng-garbage", "train", put(f"{CK}/rng.pt", GARBAGE), f"{CK}/rng.pt"),
    Case("ckpt-rng-wrong-content", "train", torch_save(f"{CK}/rng.pt", {"seed": 1}),
         f"{CK}/rng.pt"),
    Case("ckpt-weights-missing", "train", rm(f"{CK}/model.safetensors"), CK, ("weights",)),
    Case("ckpt-weights-truncated", "train", truncate(f"{CK}/model.safetensors"),
         f"{CK}/model.safetensors"),
    Case("ckpt-weights-garbage", "train", put(f"{CK}/model.safetensors", GARBAGE),
         f"{CK}/model.safetensors"),
    Case("ckpt-config-missing", "train", rm(f"{CK}/config.json"), f"{CK}/config.json"),
    Case("ckpt-config-garbage", "train", put(f"{CK}/config.json", GARBAGE), f"{CK}/config.json"),
    Case("ckpt-tokenizer-missing", "train",
         rm(f"{CK}/tokenizer.json", f"{CK}/tokenizer_config.json"), CK, ("tokenizer",)),
    Case("ckpt-folder-empty", "train", both(rm(CK), lambda c: c.p(CK).mkdir()), CK),
    Case("ckpt-folder-missing", "train", rm(CK), CK),
    Case("ckpt-marker-garbage", "train", put("run/train/checkpoints/latest", GARBAGE),
         "run/train/checkpoints/latest"),
    Case("ckpt-marker-names-missing-step", "train",
         put("run/train/checkpoints/latest", '{"step": 7}'), "step-7"),
    # the durable metrics a resumed train stage continues ---------------------------------------
    Case("train-metrics-not-utf8", "train", put(METRICS, b'{"step": 1}\n\xff\xfe\n'), METRICS,
         ("utf-8",)),
    Case("train-metrics-line-not-object", "train", put(METRICS, b'{"step": 1}\n[1, 2]\n'),
         METRICS, ("line 2",)),
    # prepared Parquet (a fresh train stage) ----------------------------------------------------
    Case("parquet-token-out-of-vocab", "train",
         both(fresh, parquet_rows(lambda rows: rows[1]["input_ids"].__setitem__(3, 100_000))),
         PARQUET, ("vocabulary",)),
    Case("parquet-token-negative", "train",
         both(fresh, parquet_rows(lambda rows: rows[0]["input_ids"].__setitem__(0, -5))),
         PARQUET, ("row 1",)),
    Case("parquet-empty-row", "train",
         both(fresh, parquet_rows(set_row(2, input_ids=[], response_start=0))), PARQUET,
         ("row 3",)),
    Case("parquet-no-response-tokens", "train",
         both(fresh, parquet_rows(lambda rows: rows[0].update(
             response_start=len(rows[0]["input_ids"])))), PARQUET, ("row 1",)),
    Case("parquet-response-start-negative", "train",
         both(fresh, parquet_rows(set_row(0, response_start=-1))), PARQUET, ("row 1",)),
    Case("parquet-null-input-ids", "train",
         both(fresh, parquet_rows(set_row(4, input_ids=None))), PARQUET, ("input_ids",)),
    Case("parquet-no-rows", "train", both(fresh, parquet_rows(lambda rows: rows.clear())),
         PARQUET),
    Case("parquet-garbage", "train", both(fresh, put(PARQUET, GARBAGE)), PARQUET),
    Case("parquet-truncated", "train", both(fresh, truncate(PARQUET)), PARQUET),
    Case("parquet-missing-column", "train",
         both(fresh, parquet_table(lambda t: t.drop_columns(["response_start"]))), PARQUET,
         ("response_start",)),
    Case("parquet-token-ids-as-text", "train",
         both(fresh, parquet_table(ids_as_text)), PARQUET, ("wrong type",)),
    Case("parquet-validation-out-of-vocab", "train",
         both(fresh, parquet_rows(lambda rows: rows[0]["input_ids"].__setitem__(1, 999_999),
                                  rel="run/data/validation.parquet")),
         "run/data/validation.parquet", ("vocabulary",)),
    # evaluation and GRPO inputs ----------------------------------------------------------------
    Case("eval-final-config-garbage", "eval", put(f"{FINAL}/config.json", GARBAGE),
         f"{FINAL}/config.json"),
    Case("eval-final-weights-truncated", "eval", truncate(f"{FINAL}/model.safetensors"),
         f"{FINAL}/model.safetensors"),
    Case("eval-final-weights-missing", "eval", rm(f"{FINAL}/model.safetensors"), FINAL,
         ("weights",)),
    Case("eval-final-tokenizer-missing", "eval",
         rm(f"{FINAL}/tokenizer.json", f"{FINAL}/tokenizer_config.json"), FINAL, ("tokenizer",)),
    Case("eval-benchmark-not-utf8", "eval", put("bench.jsonl", b'{"problem": "\xff"}'),
         "bench.jsonl"),
    Case("eval-best-metrics-not-utf8", "eval",
         both(spec_edit(_set(("eval", "checkpoints"), "best")), put(METRICS, b"\xff\xfe\n")),
         METRICS, ("utf-8",)),
    Case("grpo-prompts-not-utf8", "grpo", put("prompts.jsonl", b'{"problem": "\xff"}'),
         "prompts.jsonl"),
    Case("grpo-prompts-garbage", "grpo", put("prompts.jsonl", "{not json\n"), "prompts.jsonl"),
    Case("grpo-final-weights-garbage", "grpo", put(f"{FINAL}/model.safetensors", GARBAGE),
         f"{FINAL}/model.safetensors"),
    Case("grpo-final-config-garbage", "grpo", put(f"{FINAL}/config.json", "[]"),
         f"{FINAL}/config.json"),
    # what the report reads ---------------------------------------------------------------------
    Case("report-metrics-garbage-line", "report", put(METRICS, b'{"step": 1}\nnot json\n'),
         METRICS, ("line 2",)),
    Case("report-metrics-not-utf8", "report", put(METRICS, b'{"step": 1}\n\xff\n'), METRICS,
         ("utf-8",)),
    Case("report-metrics-line-not-object", "report", put(METRICS, b'{"step": 1}\n"step"\n'),
         METRICS, ("line 2",)),
    Case("report-metrics-step-not-number", "report", put(METRICS, b'{"step": "one"}\n'),
         METRICS, ("step",)),
    Case("report-metrics-is-a-folder", "report", both(rm(METRICS), lambda c: c.p(METRICS).mkdir()),
         METRICS),
    Case("report-grpo-metrics-garbage", "report", put("run/grpo/metrics.jsonl", GARBAGE),
         "run/grpo/metrics.jsonl"),
    Case("report-eval-summary-garbage", "report", put(EVAL_SUMMARY, "{not json"), EVAL_SUMMARY,
         ("json",)),
    Case("report-eval-summary-list", "report", put(EVAL_SUMMARY, "[1, 2]"), EVAL_SUMMARY),
    Case("report-eval-summary-not-utf8", "report", put(EVAL_SUMMARY, GARBAGE), EVAL_SUMMARY,
         ("utf-8",)),
    Case("report-eval-score-text", "report",
         json_edit(EVAL_SUMMARY, lambda d: {**d, "results": [{**d["results"][0],
                                                              "avg_at_k": "high"}]}),
         EVAL_SUMMARY, ("avg_at_k",)),
    Case("report-eval-results-not-list", "report",
         json_edit(EVAL_SUMMARY, lambda d: {**d, "results": "none"}), EVAL_SUMMARY,
         ("results",)),
]  # fmt: skip


# checks ----------------------------------------------------------------------------------------


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Relative path -> content hash (or 'dir'/'link') of everything under `root`."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames:
            out[str((here / name).relative_to(root))] = "dir"
        for name in filenames:
            path = here / name
            if path.is_symlink():
                out[str(path.relative_to(root))] = f"link:{os.readlink(path)}"
            else:
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def checkpoint_is_complete(folder: Path) -> bool:
    """Every file a resume needs, non-empty, and trainer_state.json a JSON object."""
    if not all((folder / n).is_file() and (folder / n).stat().st_size for n in CHECKPOINT_FILES):
        return False
    try:
        return isinstance(json.loads((folder / "trainer_state.json").read_text()), dict)
    except ValueError:
        return False


def markers(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.glob("*/checkpoints/latest")}


def check_markers(run: Path, before: dict[Path, bytes]) -> None:
    """A marker the stage wrote (new or changed) names a complete checkpoint."""
    for marker, body in markers(run).items():
        if before.get(marker) == body:
            continue
        step = json.loads(body)["step"]
        assert checkpoint_is_complete(marker.parent / f"step-{step}"), (marker, body)


def error_paragraph(err: str, stage: str) -> str:
    """All of stderr: one line, `psft <stage>: error: ...`."""
    assert "Traceback" not in err, err
    message = err.strip()
    assert message.startswith(f"psft {stage}: error: "), err
    assert "\n" not in message, f"not one paragraph:\n{err}"
    return message


def run_stage(c: Ctx, capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The stage through the command line, in this process; stderr at the descriptor level
    (library log handlers write to the stderr they found at import)."""
    capfd.readouterr()
    rc = main([c.stage, "--config", str(c.config_path)])
    return rc, capfd.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corrupt_input_is_one_clear_error(
    case: Case,
    base_run: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a multi-node spec joins the Ray cluster RAY_ADDRESS names: here there must be none
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path / "c"
    shutil.copytree(base_run, root, symlinks=True)
    c = Ctx(root, case.stage, stage_config(root, case.stage), root / f"{case.stage}.json")
    case.damage(c)
    if c.raw is not None:
        c.config_path.write_bytes(c.raw)
    elif c.write:
        c.config_path.write_text(json.dumps(c.config, indent=2))
    run = root / "run"
    outside, inside, marks = snapshot(root, skip=run), snapshot(run), markers(run)

    rc, err = run_stage(c, capfd)

    message = error_paragraph(err, case.stage)
    assert rc == 2, err
    assert case.names in message, f"the message does not name {case.names}: {message}"
    for word in case.says:
        assert word in message.lower(), f"{word!r} missing from: {message}"
    assert snapshot(root, skip=run) == outside, "files outside the run folder changed"
    after = snapshot(run)
    changed = sorted(k for k, v in inside.items() if after.get(k) != v)
    assert not changed, f"the failed stage lost or altered files of the run: {changed}"
    check_markers(run, marks)


def test_an_undamaged_copy_resumes_and_reports(
    base_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The control: the same copy, undamaged, passes (so each case fails for its damage)."""
    root = tmp_path / "c"
    shutil.copytree(base_run, root, symlinks=True)
    for kind in ("train", "report"):
        c = Ctx(root, kind, stage_config(root, kind), write_config(root, kind))
        rc, err = run_stage(c, capfd)
        assert rc == 0, err


def test_the_matrix_covers_every_class() -> None:
    prefixes = {c.id.split("-")[0] for c in CASES}
    assert prefixes >= {"stage", "data", "model", "ckpt", "parquet", "report", "eval", "grpo"}
    assert len(CASES) >= 55
    assert {c.stage for c in CASES} == {"prepare", "train", "eval", "grpo", "report"}


# a full disk -----------------------------------------------------------------------------------


def _disk_usage(path: Path) -> int:
    """Bytes `path` takes on a tmpfs: every file rounded up to whole 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())


def psft(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command line in a process of its own (no file of it stays open here)."""
    return subprocess.run(
        [sys.executable, "-m", "psft.workflows.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_full_disk_stops_training_and_keeps_the_last_checkpoint(
    base_run: Path, tmp_path: Path
) -> None:
    root = tmp_path / "d"
    root.mkdir()
    for name in ("model", "data"):
        shutil.copytree(base_run / name, root / name)
    disk = root / "run"
    disk.mkdir()
    checkpoint = _disk_usage(base_run / CK)
    prepared = _disk_usage(base_run / "run" / "data")
    # room for the prepared data, two checkpoints and a little: the third save fills it
    size_kib = (prepared + int(2.6 * checkpoint)) // 1024
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        shutil.copytree(base_run / "run" / "data", disk / "data")
        config = stage_config(root, "train")
        config["job"]["spec"]["psft"].update(maxSteps=6, keepCheckpoints=6)
        path = write_config(root, "train", config)
        outside = snapshot(root, skip=disk)

        done = psft("train", "--config", str(path))
        # the run got as far as training (its progress is on stderr too): the error ends it
        assert "Traceback" not in done.stderr, done.stderr
        message = done.stderr[done.stderr.rindex("psft train: error: ") :].strip()
        assert "\n" not in message, done.stderr
        assert done.returncode == 2, done.stderr
        assert "the disk is full" in message and str(disk) in message, message
        latest = json.loads((disk / "train/checkpoints/latest").read_text())["step"]
        assert 1 <= latest < 6, latest
        assert f"step-{latest}, is kept" in message, message
        assert checkpoint_is_complete(disk / f"train/checkpoints/step-{latest}")
        # no half-written checkpoint (or final model) is left taking the space
        steps = sorted(p.name for p in (disk / "train/checkpoints").glob("step-*"))
        assert steps == [f"step-{s}" for s in range(1, latest + 1)], steps
        assert not (disk / "train/final").exists()
        assert snapshot(root, skip=disk) == outside

        remount = ["mount", "-o", "remount,size=16m", str(disk)]
        subprocess.run(remount, check=True, capture_output=True)
        done = psft("train", "--config", str(path))
        assert done.returncode == 0, done.stderr
        assert f"resuming train from checkpoint step {latest}" in done.stdout + done.stderr
        records = [
            json.loads(line) for line in (disk / "train/metrics.jsonl").read_text().splitlines()
        ]
        # the held-out baseline before any update (step 0), then every step once
        assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
        assert "val_loss" in records[0] and "loss" not in records[0]
        assert checkpoint_is_complete(disk / "train/checkpoints/step-6")
        assert (disk / "train/final/model.safetensors").is_file()
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
