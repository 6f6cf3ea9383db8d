"""A tiny randomly initialised causal LM with a real (small, trained) BPE tokenizer.

Fast unit tests use it instead of a pretrained model: same code paths (chat template,
EOS, padding, safetensors), milliseconds per step. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "What is 2 + 3? We add the numbers: 2 + 3 = 5. The answer is \\boxed{5}.",
    "Find x such that 3x = 12. Dividing by 3 gives x = 4, so \\boxed{4}.",
    "The area of a circle of radius r is \\pi r^2; with r = 2 it is \\boxed{4\\pi}.",
    "Compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. Answer: \\boxed{\\frac{5}{6}}.",
    "A train travels 60 miles in 1.5 hours; its speed is 40 miles per hour.",
    "(A) 1 (B) 2 (C) 3 (D) 4. The correct option is (C).",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ +-*/=()[]{}^_.,;:!?'\"",
]


def make_tiny_model(
    out: Path, arch: str = "llama", vocab_size: int = 384, hidden: int = 32, layers: int = 2
) -> Path:
    """Write a tiny model + tokenizer folder loadable with AutoModelForCausalLM."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=specials[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    common = dict(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    config = (LlamaConfig if arch == "llama" else Qwen2Config)(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out
