"""A CPU platform for verl, loaded through verl's external-module hook.

verl 0.9.1 knows CUDA, NPU and ROCm only. Importing this module (set
`VERL_USE_EXTERNAL_MODULES=psft.trainer.verl.platform_cpu` and `VERL_PLATFORM=cpu` before
verl is imported; `psft.trainer.verl.launch` does both) registers a platform whose device
is `cpu` and whose collective backend is gloo, so verl's FSDP2 engine trains on CPUs.
Pair it with `attn_implementation=sdpa`, `use_remove_padding=False`,
`use_torch_compile=False` and fp32 mixed precision (`config.cpu_overrides`).

verl's `initialize_global_process_group` asks torch for "cpu:gloo,cpu:gloo", which torch
rejects; `init_process_group` below starts plain gloo instead.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

PLATFORM_NAME = "cpu"


def _no_op(*_args: Any, **_kwargs: Any) -> None:
    return None


def _zero(*_args: Any, **_kwargs: Any) -> int:
    return 0


def _cpu_device_module() -> types.ModuleType:
    """torch.cpu plus the torch.cuda-style calls verl makes (memory stats, RNG, caches)."""
    module = types.ModuleType("psft_verl_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    module.is_available = lambda: True
    module.device_count = lambda: 1
    module.current_device = lambda: "cpu"
    module.set_device = _no_op
    module.empty_cache = _no_op
    module.ipc_collect = _no_op
    module.reset_peak_memory_stats = _no_op
    module.set_per_process_memory_fraction = _no_op
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.get_rng_state = lambda *_a, **_k: torch.get_rng_state()
    module.set_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)
    module.get_device_name = lambda *_a, **_k: "cpu"
    for stat in ("memory_allocated", "memory_reserved", "max_memory_allocated"):
        setattr(module, stat, _zero)
    module.max_memory_reserved = _zero
    module.mem_get_info = lambda *_a, **_k: (0, 0)
    return module


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """Device `cpu`, collectives over gloo, no profiler, no IPC, no Ray accelerator."""

    _module = _cpu_device_module()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # only chosen explicitly (VERL_PLATFORM=cpu): never shadow a real accelerator
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

    def current_device(self) -> str:  # type: ignore[override]
        # verl moves tensors with `.to(get_device_id())`; an int would mean an accelerator
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "PSFT_VISIBLE_CPUS"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_cpus": max(1, int(num_gpus))}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def use_in_this_process() -> None:
    """Make the CPU platform current in a process that imported verl without the hook
    (e.g. `psft train` itself, which only composes and checks the config)."""
    from verl.plugin.platform import platform_manager

    if platform_manager._current_platform is None:
        platform_manager.set_platform(PlatformCPU())


def init_process_group(timeout_s: int = 36000) -> tuple[int, int, int]:
    """verl's `initialize_global_process_group`, with plain gloo (torchrun env variables)."""
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init_process_group_ray(timeout_second: int | None = None, backend: str | None = None) -> None:
    """verl's `initialize_global_process_group_ray` (a Ray worker: RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT set by verl's RayWorkerGroup), with plain gloo."""
    from verl.utils.distributed import initialize_global_process_group_ray

    initialize_global_process_group_ray(timeout_second=timeout_second, backend="gloo")


def install() -> None:
    """Route verl's process-group inits (torchrun and Ray workers) through gloo and let its
    FSDP engines (registered for cuda and npu only) serve the `cpu` device. Idempotent."""
    import verl.utils.distributed as verl_distributed
    import verl.workers.engine_workers as engine_workers
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import (
        FSDPEngineWithLMHead,
        FSDPEngineWithValueHead,
    )

    verl_distributed.initialize_global_process_group = init_process_group
    engine_workers.initialize_global_process_group_ray = init_process_group_ray
    for model_type, engine in (
        ("language_model", FSDPEngineWithLMHead),
        ("value_model", FSDPEngineWithValueHead),
    ):
        for backend in ("fsdp", "fsdp2"):
            EngineRegistry._engines[model_type][backend].setdefault(PLATFORM_NAME, engine)
