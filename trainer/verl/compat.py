"""Work-arounds for verl 0.9.1 next to the rest of our dependencies."""

from __future__ import annotations


def skip_trl_value_head_patch() -> None:
    """verl patches TRL's `AutoModelForCausalLMWithValueHead` (PPO critics) whenever TRL is
    importable, and fails with TRL 1.x, which no longer has that class. Our verl runs have
    no value head (PSFT, GRPO), so the patch is skipped; TRL stays installed for the
    one-machine GRPO stage."""
    from verl.models.transformers import monkey_patch

    monkey_patch.is_trl_available = lambda: False
