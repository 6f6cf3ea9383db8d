"""The real SmolLM2-135M-Instruct through prepare and a 2-step PSFT run (integration)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from psft.trainer.engine.loop import train
from psft.trainer.model import load_model_and_tokenizer
from psft.trainer.prepare import prepare
from psft.trainer.storage import LocalRunStore
from psft.workflows import layout

pytestmark = pytest.mark.integration

ROWS = [
    ("What is 7 + 5?", "Adding, 7 + 5 = 12. The answer is $\\boxed{12}$."),
    ("What is 6 times 4?", "Multiplying, 6 \\cdot 4 = 24. The answer is $\\boxed{24}$."),
    ("Solve 2x = 10.", "Dividing both sides by 2 gives x = 5, so $\\boxed{5}$."),
    ("What is 15 - 9?", "Subtracting, 15 - 9 = 6. The answer is $\\boxed{6}$."),
]


def test_psft_two_steps_on_smollm2(smollm2_dir: Path, tmp_path: Path, config_factory) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": [{"role": "user", "content": q}], "demonstration": a}) + "\n"
            for q, a in ROWS
        )
    )
    config = config_factory(
        tmp_path,
        str(smollm2_dir),
        [str(data)],
        kind="train",
        psft={
            "batchSize": 2,
            "miniBatchSize": 1,
            "microBatchSize": 1,
            "maxSteps": 2,
            "learningRate": 1e-4,
            "warmupSteps": 0,
        },
    )
    store = LocalRunStore(Path(config.run_root))
    stats = prepare(config, store)
    assert stats["eos_token"] == "<|im_end|>"
    summary = train(config, store)
    assert summary is not None and summary["steps"] == 2

    records = [
        json.loads(line)
        for line in store.local_path(layout.metrics("train")).read_text().splitlines()
    ]
    assert len(records) == 2
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["entropy"] > 0 and r["tokens_per_second"] > 0
        # the second mini-batch is scored against the pre-update policy: ratios move off 1
        assert r["ratio_max"] > 1.0
    # a pretrained model already predicts these answers well (a random one: ~10.8 nats)
    assert records[0]["nll"] < 3.0

    final, _ = load_model_and_tokenizer(store.local_path(layout.final_model("train")), device="cpu")
    ckpt, _ = load_model_and_tokenizer(
        store.local_path(layout.checkpoint("train", 2)), device="cpu"
    )
    base, _ = load_model_and_tokenizer(smollm2_dir, device="cpu")
    final_sd, ckpt_sd, base_sd = final.state_dict(), ckpt.state_dict(), base.state_dict()
    for name, tensor in final_sd.items():
        assert torch.equal(tensor, ckpt_sd[name]), name
    assert any(not torch.equal(final_sd[n], base_sd[n]) for n in final_sd)
