"""Generation backends for evaluation: transformers (CPU, one GPU) and vLLM (GPU pods)."""

from __future__ import annotations

from typing import Literal

from psft.workflows.errors import UserError

BackendName = Literal["vllm", "transformers"]


def choose_backend(requested: str, *, cuda: bool | None = None) -> BackendName:
    """`auto`: vLLM when it is importable and a GPU is present, else transformers."""
    from psft.trainer.eval.backends.vllm import vllm_available

    if requested == "transformers":
        return "transformers"
    if requested == "vllm":
        if not vllm_available():
            raise UserError(
                "eval.backend is 'vllm' but vLLM is not installed here; use the GPU trainer "
                "image, or set eval.backend to transformers (or auto)"
            )
        return "vllm"
    if requested != "auto":
        raise UserError(f"eval.backend {requested!r}: use auto, vllm or transformers")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return "vllm" if cuda and vllm_available() else "transformers"
