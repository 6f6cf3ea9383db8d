"""The CPU platform plugin, the `psft` policy loss in verl's registry, the data adapter."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from psft.workflows.errors import UserError

pytest.importorskip("verl")


def test_plugin_is_loaded_by_verls_hook_and_selected_by_name():
    code = (
        "from verl.plugin.platform import get_platform\n"
        "from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device\n"
        "from verl.workers.engine.base import EngineRegistry\n"
        "from psft.trainer.verl import platform_cpu\n"
        "platform_cpu.install()\n"
        "p = get_platform()\n"
        "m = get_torch_device()\n"
        "engine = EngineRegistry.get_engine_cls('language_model', 'fsdp2').__name__\n"
        "print(type(p).__name__, get_device_name(), get_nccl_backend(),"
        " m.max_memory_allocated(), m.current_device(), engine)\n"
    )
    env = {
        "VERL_USE_EXTERNAL_MODULES": "psft.trainer.verl.platform_cpu",
        "VERL_PLATFORM": "cpu",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-6:] == [
        "PlatformCPU",
        "cpu",
        "gloo",
        "0",
        "cpu",
        "FSDPEngineWithLMHead",
    ]


def test_plugin_never_claims_a_machine_unasked(monkeypatch):
    from psft.trainer.verl.platform_cpu import PlatformCPU

    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    assert not PlatformCPU().is_platform_available(use_smi_check=True)
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert PlatformCPU().is_platform_available(use_smi_check=True)


class _ActorConfig(dict):
    """The attributes verl's policy losses read from an ActorConfig."""

    def __init__(self, **kw):
        super().__init__(clip_ratio_c=kw.pop("clip_ratio_c"))
        self.__dict__.update(kw)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_registered_psft_loss_equals_verls_vanilla_ppo_loss(sign):
    """Through the registry, `psft` is verl's dual-clip PPO loss (ours is computed by
    psft.trainer.loss); PSFT is its special case with advantage +1."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    import psft.trainer.verl.psft_trainer  # noqa: F401  (registers "psft")

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 9, generator=g) * 3
    new = old + torch.randn(4, 9, generator=g) * 0.4
    adv = sign * torch.rand(4, 1, generator=g).expand(4, 9)
    mask = (torch.rand(4, 9, generator=g) > 0.3).float()
    config = _ActorConfig(
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        global_batch_info={"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None},
    )
    ours, ours_m = get_policy_loss_fn("psft")(old, new, adv, mask, "token-mean", config)
    theirs, theirs_m = get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-mean", config)
    torch.testing.assert_close(ours, theirs)
    if sign > 0:
        assert ours_m["actor/pg_clipfrac"] == pytest.approx(theirs_m["actor/pg_clipfrac"])


def test_engine_loss_aligns_the_mask_with_verls_shifted_log_probs():
    """verl's log_probs[t] scores token t+1: a response starting at token 2 is scored at
    positions 1.. (the last position wraps to the prompt start and is masked)."""
    from psft.trainer.verl.psft_trainer import shifted_response_mask

    mask = torch.nested.as_nested_tensor(
        [torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1])], layout=torch.jagged
    )
    assert shifted_response_mask(mask).tolist() == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]


def test_data_adapter(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from psft.trainer.verl.data import verl_rows

    src = tmp_path / "train.parquet"
    pq.write_table(pa.table({"input_ids": [[5, 6, 7, 8]], "response_start": [2]}), src)
    out = verl_rows(src, tmp_path / "v.parquet")
    assert pq.read_table(out).to_pylist() == [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}
    ]

    pq.write_table(pa.table({"input_ids": [[5, 6]], "response_start": [2]}), src)
    with pytest.raises(UserError, match="row 0: response_start 2 outside"):
        verl_rows(src, tmp_path / "v.parquet")
    pq.write_table(pa.table({"input_ids": [[5, 6]]}), src)
    with pytest.raises(UserError, match="no response_start column"):
        verl_rows(src, tmp_path / "v.parquet")
    pq.write_table(
        pa.table(
            {
                "input_ids": pa.array([], pa.list_(pa.int32())),
                "response_start": pa.array([], pa.int32()),
            }
        ),
        src,
    )
    assert verl_rows(src, tmp_path / "v.parquet") is None
