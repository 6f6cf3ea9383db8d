"""The native engine: the shared-forward step, schedule, resume, determinism, stage outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from psft.trainer.data import collate, read_examples
from psft.trainer.engine.loop import Trainer, train
from psft.trainer.engine.optim import build_optimizer
from psft.trainer.engine.step import ObjectiveConfig, old_logprobs, policy_forward, train_step
from psft.trainer.loss import sft_loss
from psft.trainer.model import load_model_and_tokenizer
from psft.trainer.prepare import prepare
from psft.trainer.storage import LocalRunStore
from psft.workflows import layout
from psft.workflows.cli import main as cli_main
from psft.workflows.errors import UserError

CONTRACT_KEYS = {
    "step", "total_steps", "epoch", "loss", "entropy", "clip_fraction", "ratio_mean",
    "ratio_max", "approx_kl", "grad_norm", "learning_rate", "tokens_per_second", "tokens",
    "elapsed_s",
}  # fmt: skip

ROWS = [
    {
        "id": f"q{i}",
        "prompt": [{"role": "user", "content": f"What is {i} + 3?"}],
        "demonstration": f"We add: {i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}.",
    }
    for i in range(20)
]
PSFT = {
    "batchSize": 4,
    "miniBatchSize": 2,
    "microBatchSize": 1,
    "learningRate": 3e-3,
    "warmupSteps": 1,
}


@pytest.fixture
def data_file(tmp_path: Path) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def prepared(make_config, data_file: str, **psft):
    config = make_config(
        [data_file],
        kind="train",
        psft={**PSFT, **psft},
        dataset={"validation": {"fraction": 0.2}, "systemPrompt": ""},
    )
    store = LocalRunStore(Path(config.run_root))
    prepare(config, store)
    return config, store


def all_records(store) -> list[dict]:
    path = store.local_path(layout.metrics("train"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def records(store) -> list[dict]:
    """The step records (without the step-0 held-out baseline)."""
    return [r for r in all_records(store) if r["step"] > 0]


def test_first_minibatch_shares_its_forward_and_later_ones_use_pre_update_policy(
    tiny_model_dir, make_config, data_file
) -> None:
    _, store = prepared(make_config, data_file)
    examples = read_examples(store.pull(layout.DATA_TRAIN))[:4]

    def fresh():
        model, tok = load_model_and_tokenizer(tiny_model_dir, device="cpu")
        mbs = [[collate([e], tok.pad_token_id) for e in examples[i : i + 2]] for i in (0, 2)]
        opt = build_optimizer(model.parameters(), learning_rate=1e-2, weight_decay=0.0)
        return model, mbs, opt

    model, mbs, opt = fresh()
    calls = []
    original = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    model.forward = counting_forward
    default = train_step(model, opt, mbs, ObjectiveConfig(objective="psft"))
    # 2 no-grad forwards (old log-probs of mini-batch 2) + 4 training forwards: none extra
    assert calls == [False, False, True, True, True, True]
    assert default.updates == 2
    assert default.stats.ratio_max > 1.0  # mini-batch 2 sees the policy moved by update 1

    # the same step with old log-probs taken explicitly before any update gives the same step
    model, mbs, opt = fresh()
    explicit_old = [None, old_logprobs(model, mbs[1])]
    explicit = train_step(model, opt, mbs, ObjectiveConfig(objective="psft"), old=explicit_old)
    assert explicit.stats == default.stats and explicit.loss == default.loss

    # whereas old log-probs of the updated policy would give different ratios
    model, mbs, opt = fresh()
    train_step(model, opt, mbs[:1], ObjectiveConfig(objective="psft"))
    stale = [None, old_logprobs(model, mbs[1])]
    model, mbs, opt = fresh()
    wrong = train_step(model, opt, mbs, ObjectiveConfig(objective="psft"), old=stale)
    assert wrong.stats.ratio_sum != default.stats.ratio_sum


def test_one_minibatch_psft_step_equals_sft_step(tiny_model_dir, make_config, data_file) -> None:
    _, store = prepared(make_config, data_file)
    examples = read_examples(store.pull(layout.DATA_TRAIN))[:4]

    def after_step(objective: str):
        torch.manual_seed(0)
        model, tok = load_model_and_tokenizer(tiny_model_dir, device="cpu")
        mbs = [[collate(examples[i : i + 2], tok.pad_token_id) for i in (0, 2)]]
        opt = build_optimizer(model.parameters(), learning_rate=1e-2, weight_decay=0.1)
        result = train_step(model, opt, mbs, ObjectiveConfig(objective=objective))
        return result, [p.detach().clone() for p in model.parameters()]

    psft, psft_params = after_step("psft")
    sft, sft_params = after_step("sft")
    assert psft.stats.means()["ratio_mean"] == 1.0 and psft.stats.means()["clip_fraction"] == 0
    assert psft.grad_norm == pytest.approx(sft.grad_norm, rel=1e-5)
    assert psft.nll == pytest.approx(sft.nll, rel=1e-6)
    assert psft.entropy == pytest.approx(sft.entropy, rel=1e-6)
    for a, b in zip(psft_params, sft_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_micro_batch_accumulation_matches_one_big_forward(tiny_model_dir, make_config, data_file):
    _, store = prepared(make_config, data_file)
    examples = read_examples(store.pull(layout.DATA_TRAIN))[:4]
    model, tok = load_model_and_tokenizer(tiny_model_dir, device="cpu")

    def grads(micros):
        model.zero_grad()
        for m in micros:
            logp, _ = policy_forward(model, m, with_entropy=False)
            total = sum(float(x["loss_mask"].sum()) for x in micros)
            sft_loss(logp, m["loss_mask"], denominator=total).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    one = grads([collate(examples, tok.pad_token_id)])
    split = grads([collate(examples[i : i + 1], tok.pad_token_id) for i in range(4)])
    torch.testing.assert_close(one, split, rtol=1e-4, atol=1e-6)


def test_train_stage_outputs_metrics_checkpoints_and_final_model(
    make_config, data_file, tmp_path
) -> None:
    config, store = prepared(make_config, data_file, maxSteps=4, saveEvery=2, keepCheckpoints=1)
    config_path = tmp_path / "train.json"
    config_path.write_text(config.dump())
    assert cli_main(["train", "--config", str(config_path)]) == 0

    baseline, *recs = all_records(store)
    # the starting policy's held-out NLL and entropy, before any update
    assert baseline["step"] == 0 and "loss" not in baseline
    assert baseline["val_loss"] > recs[-1]["val_loss"] and baseline["val_entropy"] > 0
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert set(r) >= CONTRACT_KEYS, CONTRACT_KEYS - set(r)
        assert r["total_steps"] == 4 and r["entropy"] > 0
    assert "val_loss" in recs[1] and "val_entropy" in recs[3] and "val_loss" not in recs[0]
    # one warm-up step: step 1 trains at lr 0 (verl's and the seed's warm-up), then the peak
    assert recs[0]["learning_rate"] == 0.0
    assert [r["learning_rate"] for r in recs[1:]] == pytest.approx([3e-3] * 3)
    assert recs[-1]["tokens"] == sum(e.response_tokens for e in read_examples(
        store.pull(layout.DATA_TRAIN))[:16])  # fmt: skip
    # the clip engages: the second mini-batch sees a policy moved by a large learning rate
    assert max(r["ratio_max"] for r in recs) != 1.0

    assert store.latest_checkpoint("train") == 4
    assert not store.exists(layout.checkpoint("train", 2))  # pruned (keepCheckpoints 1)
    final = store.local_path(layout.final_model("train"))
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    model, _ = load_model_and_tokenizer(final, device="cpu")
    assert model.dtype == torch.float32
    summary = json.loads(store.local_path(layout.stage_summary("train")).read_text())
    assert summary["steps"] == 4 and summary["final"]["val_loss"] == recs[-1]["val_loss"]


def test_resume_continues_the_same_loss_curve(make_config, data_file, tmp_path) -> None:
    straight_cfg, straight_store = prepared(make_config, data_file, maxSteps=4, saveEvery=2)
    train(straight_cfg, straight_store)
    straight = records(straight_store)

    resumed_cfg = straight_cfg.model_copy(update={"run_root": str(tmp_path / "resumed")})
    resumed_store = LocalRunStore(Path(resumed_cfg.run_root))
    prepare(resumed_cfg, resumed_store)
    assert train(resumed_cfg, resumed_store, stop_after=2) is None
    assert resumed_store.latest_checkpoint("train") == 2
    # a crash after step 3 left a record the restarted stage must not keep twice
    with resumed_store.local_path(layout.metrics("train")).open("a") as f:
        f.write(json.dumps({**straight[2], "loss": 123.0}) + "\n")
    trainer = Trainer(resumed_cfg, resumed_store)
    assert trainer.resume_step == 2 and trainer.state.step == 2
    trainer.fit()
    resumed = records(resumed_store)
    # steps 1-2 ran in an independent process-like run: equal losses also show determinism
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "nll", "entropy", "grad_norm", "ratio_mean", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert resumed[-1]["val_loss"] == pytest.approx(straight[-1]["val_loss"], rel=1e-5)


def test_resume_refuses_changed_data(make_config, data_file, tmp_path) -> None:
    cfg, store = prepared(make_config, data_file, maxSteps=2, saveEvery=1)
    train(cfg, store, stop_after=1)
    Path(data_file).write_text("".join(json.dumps(r) + "\n" for r in ROWS[:-1]))
    prepare(cfg, store)
    with pytest.raises(UserError, match="prepared training data changed"):
        Trainer(cfg, store)


def test_sft_objective_logs_the_same_keys(make_config, data_file) -> None:
    cfg, store = prepared(make_config, data_file, maxSteps=2, objective="sft")
    summary = train(cfg, store)
    recs = records(store)
    assert set(recs[0]) >= CONTRACT_KEYS
    assert recs[0]["ratio_mean"] == 1.0 and recs[0]["clip_fraction"] == 0.0
    assert recs[0]["loss"] == pytest.approx(recs[0]["nll"], rel=0.1)
    assert summary["objective"] == "sft"


def test_precision_is_mixed_on_cuda_and_literal_on_cpu() -> None:
    from psft.trainer.engine.precision import resolve_precision

    gpu = resolve_precision("auto", "cuda")
    assert gpu.param_dtype == torch.float32 and gpu.autocast_dtype == torch.bfloat16
    assert resolve_precision("float16", "cuda").autocast_dtype == torch.float16
    assert resolve_precision("float32", "cuda").autocast_dtype is None
    cpu = resolve_precision("auto", "cpu")
    assert cpu.param_dtype == torch.float32 and cpu.autocast_dtype is None
    assert resolve_precision("bfloat16", "cpu").param_dtype == torch.bfloat16


def test_engine_selection(make_config) -> None:
    from psft.trainer.train import select_engine

    assert select_engine(make_config(["x.jsonl"], kind="train")) == "native"
    many = make_config(["x.jsonl"], kind="train", resources={"gpusPerNode": 4, "device": "auto"})
    assert select_engine(many) == "verl"
    forced = make_config(["x.jsonl"], kind="train", psft={"engine": "native"},
                         resources={"gpusPerNode": 4, "device": "auto"})  # fmt: skip
    assert select_engine(forced) == "native"


def test_train_without_prepared_data_is_a_clear_error(make_config, tmp_path, capsys) -> None:
    config_path = tmp_path / "train.json"
    config_path.write_text(make_config(["x.jsonl"], kind="train").dump())
    assert cli_main(["train", "--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert "data/train.parquet is missing" in err and "Traceback" not in err
