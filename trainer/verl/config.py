"""PSFTJob -> verl configuration: the one place where our spec meets verl's config keys.

`verl_settings` is a pure function returning `Setting`s (verl key, value, the spec field
it comes from). `compose_config` applies them to verl's own `sft_trainer_engine.yaml`
with OmegaConf (values are set as Python objects, never parsed from strings), and
`check_config` converts the sections to verl's dataclasses the way verl's trainer does,
so a value verl rejects is reported against our spec field before any process starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psft.workflows.errors import UserError
from psft.workflows.spec import PSFTJob

VERL_CONFIG_NAME = "sft_trainer_engine"
DATASET_CLASS = ("pkg://psft.trainer.verl.psft_trainer", "PreTokenizedDataset")
ENGINE_FIELD = "spec.psft.engine"
"""Settings that are engine internals, not user choices, name this field."""


@dataclass(frozen=True)
class Setting:
    key: str
    """Dotted verl config key, e.g. `optim.lr`."""
    value: Any
    field: str
    """The PSFTJob field the value comes from, e.g. `spec.psft.learningRate`."""


@dataclass(frozen=True)
class VerlInputs:
    """What the launcher resolved for this run (paths, device, world size)."""

    model_path: str
    train_files: list[str]
    checkpoint_dir: str
    device: str
    """`cpu` or `cuda`."""
    val_files: list[str] | None = None
    nproc_per_node: int = 1


def _precision(job: PSFTJob, device: str) -> str:
    dtype = job.spec.model.dtype
    if dtype == "auto":
        return "fp32" if device == "cpu" else "bf16"
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


def verl_settings(job: PSFTJob, inputs: VerlInputs) -> list[Setting]:
    """Every verl config value a PSFT run sets, each tied to the spec field it comes from."""
    spec = job.spec
    psft, data, model, res = spec.psft, spec.dataset, spec.model, spec.resources
    precision = _precision(job, inputs.device)
    s = [
        Setting("model.path", inputs.model_path, "spec.model.source"),
        Setting("model.trust_remote_code", model.trust_remote_code, "spec.model.trustRemoteCode"),
        Setting("model.custom_chat_template", model.chat_template, "spec.model.chatTemplate"),
        Setting(
            "model.enable_gradient_checkpointing",
            psft.gradient_checkpointing,
            "spec.psft.gradientCheckpointing",
        ),
        Setting("engine.mixed_precision.param_dtype", precision, "spec.model.dtype"),
        Setting("engine.mixed_precision.reduce_dtype", "fp32", "spec.model.dtype"),
        Setting("engine.mixed_precision.buffer_dtype", "fp32", "spec.model.dtype"),
        Setting("data.train_files", list(inputs.train_files), "spec.dataset.train"),
        Setting("data.val_files", inputs.val_files or None, "spec.dataset.validation"),
        Setting(
            "data.max_length",
            data.max_prompt_length + data.max_response_length,
            "spec.dataset.maxResponseLength",
        ),
        Setting("psft.shuffle", data.shuffle, "spec.dataset.shuffle"),
        Setting("psft.balance_batch", psft.balance_batch, "spec.psft.balanceBatch"),
        Setting("data.train_batch_size", psft.batch_size, "spec.psft.batchSize"),
        Setting("psft.mini_batch_size", psft.mini_batch_size, "spec.psft.miniBatchSize"),
        Setting("data.micro_batch_size_per_gpu", psft.micro_batch_size, "spec.psft.microBatchSize"),
        Setting("psft.objective", psft.objective, "spec.psft.objective"),
        Setting("psft.clip_ratio_low", psft.clip_ratio_low, "spec.psft.clipRatioLow"),
        Setting("psft.clip_ratio_high", psft.clip_ratio_high, "spec.psft.clipRatioHigh"),
        Setting("psft.clip_ratio_c", psft.clip_ratio_c, "spec.psft.clipRatioC"),
        Setting("psft.loss_agg_mode", psft.loss_agg_mode, "spec.psft.lossAggMode"),
        Setting("trainer.total_epochs", psft.epochs, "spec.psft.epochs"),
        Setting("trainer.total_training_steps", psft.max_steps, "spec.psft.maxSteps"),
        Setting("optim.lr", psft.learning_rate, "spec.psft.learningRate"),
        Setting("optim.lr_scheduler_type", psft.lr_scheduler, "spec.psft.lrScheduler"),
        Setting("optim.lr_warmup_steps", psft.warmup_steps, "spec.psft.warmupSteps"),
        Setting("optim.lr_warmup_steps_ratio", 0.0, "spec.psft.warmupSteps"),
        # verl's scheduler is the native engine's (psft.trainer.engine.optim): cosine down
        # to 0 over half a period, steps counted from 0
        Setting("optim.min_lr_ratio", 0.0, "spec.psft.lrScheduler"),
        Setting("optim.num_cycles", 0.5, "spec.psft.lrScheduler"),
        Setting("optim.zero_indexed_step", True, "spec.psft.lrScheduler"),
        Setting("optim.weight_decay", psft.weight_decay, "spec.psft.weightDecay"),
        Setting("optim.clip_grad", psft.grad_clip, "spec.psft.gradClip"),
        Setting("trainer.seed", psft.seed, "spec.psft.seed"),
        Setting("engine.seed", psft.seed, "spec.psft.seed"),
        Setting("trainer.save_freq", psft.save_every or -1, "spec.psft.saveEvery"),
        Setting("trainer.max_ckpt_to_keep", psft.keep_checkpoints, "spec.psft.keepCheckpoints"),
        Setting("trainer.nnodes", res.nodes, "spec.resources.nodes"),
        Setting("trainer.n_gpus_per_node", inputs.nproc_per_node, "spec.resources.gpusPerNode"),
        Setting("trainer.device", inputs.device, "spec.resources.device"),
        Setting("trainer.experiment_name", job.metadata.name, "metadata.name"),
        # engine internals: verl's FSDP2 engine, our pre-tokenized rows, no external loggers
        Setting("engine.strategy", "fsdp2", ENGINE_FIELD),
        Setting(
            "data.use_dynamic_bsz",
            psft.max_tokens_per_micro_batch is not None,
            "spec.psft.maxTokensPerMicroBatch",
        ),
        Setting(
            "data.max_token_len_per_gpu",
            psft.max_tokens_per_micro_batch or data.max_prompt_length + data.max_response_length,
            "spec.psft.maxTokensPerMicroBatch",
        ),
        Setting("data.pad_mode", "no_padding", ENGINE_FIELD),
        Setting("data.truncation", "error", ENGINE_FIELD),
        Setting("data.num_workers", 0, ENGINE_FIELD),
        Setting("data.custom_cls.path", DATASET_CLASS[0], ENGINE_FIELD),
        Setting("data.custom_cls.name", DATASET_CLASS[1], ENGINE_FIELD),
        Setting("trainer.logger", ["console"], ENGINE_FIELD),
        Setting("trainer.project_name", "psft", ENGINE_FIELD),
        Setting("trainer.default_local_dir", inputs.checkpoint_dir, ENGINE_FIELD),
        Setting("trainer.resume_mode", "auto", ENGINE_FIELD),
        Setting("checkpoint.save_contents", ["model", "optimizer", "extra"], ENGINE_FIELD),
    ]
    if inputs.device == "cpu":
        # what verl's FSDP2 engine needs to run on CPUs (see platform_cpu)
        s += [
            Setting("model.use_remove_padding", False, "spec.resources.device"),
            Setting("model.override_config.attn_implementation", "sdpa", "spec.resources.device"),
            Setting("engine.use_torch_compile", False, "spec.resources.device"),
        ]
    return s


def verl_config_dir() -> str:
    import verl.trainer.sft_trainer as sft_trainer

    return os.path.join(os.path.dirname(sft_trainer.__file__), "config")


def base_config() -> Any:
    """verl's own SFT trainer config, composed by hydra from the installed package."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
        return compose(config_name=VERL_CONFIG_NAME)


def apply_settings(config: Any, settings: list[Setting]) -> Any:
    """Set each value on a copy of `config`; a rejected one raises UserError naming its field."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config = OmegaConf.create(OmegaConf.to_container(config))  # writable copy, no struct flag
    for setting in settings:
        try:
            OmegaConf.update(config, setting.key, setting.value, merge=False, force_add=True)
        except OmegaConfBaseException as exc:
            raise rejected(setting, exc) from exc
    return config


def rejected(setting: Setting, exc: BaseException) -> UserError:
    causes, seen = [], exc
    while seen is not None and len(causes) < 4:
        text = " ".join(str(seen).split())
        if text and text not in causes:
            causes.append(text)
        seen = seen.__cause__ or seen.__context__
    reason = causes[-1] if causes else type(exc).__name__
    return UserError(
        f"{setting.field}: verl rejected {setting.key}={setting.value!r} derived from it: "
        f"{reason[:300]}"
    )


SECTIONS = ("engine", "optim", "checkpoint")
"""Config sections verl turns into dataclasses with validation (model needs the files)."""


def _convert(config: Any, section: str) -> None:
    from verl.utils.config import omega_conf_to_dataclass

    omega_conf_to_dataclass(config[section])


def check_config(config: Any, settings: list[Setting]) -> None:
    """Validate `config` as verl does and blame the first of our settings that breaks it.

    For a section verl refuses, each of our settings in it is put back to verl's default
    in turn; the one whose removal makes verl accept the section is the culprit.
    """
    base = base_config()
    for section in SECTIONS:
        try:
            _convert(config, section)
        except Exception as exc:
            mine = [s for s in settings if s.key.split(".")[0] == section]
            for suspect in mine:
                trial = apply_settings(base, [s for s in settings if s is not suspect])
                try:
                    _convert(trial, section)
                except Exception:
                    continue
                raise rejected(suspect, exc) from exc
            raise UserError(f"verl rejected its {section!r} settings: {exc}") from exc
    _check_batches(config, settings)


def _check_batches(config: Any, settings: list[Setting]) -> None:
    """Batch arithmetic verl asserts on deep inside a run, checked up front."""
    by_key = {s.key: s for s in settings}
    world = int(config.trainer.nnodes) * int(config.trainer.n_gpus_per_node)
    batch, mini = int(config.data.train_batch_size), int(config.psft.mini_batch_size)
    if batch % mini:
        raise UserError(
            f"{by_key['psft.mini_batch_size'].field}: {mini} must divide "
            f"spec.psft.batchSize ({batch})"
        )
    if batch % world or mini % world:
        raise UserError(
            f"{by_key['data.train_batch_size'].field}: batchSize ({batch}) and miniBatchSize "
            f"({mini}) must be multiples of the number of training processes ({world})"
        )


def build_config(job: PSFTJob, inputs: VerlInputs) -> Any:
    """The complete, checked verl config for a PSFT run."""
    settings = verl_settings(job, inputs)
    config = apply_settings(base_config(), settings)
    check_config(config, settings)
    return config


def save_config(config: Any, path: Path) -> None:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, path)
