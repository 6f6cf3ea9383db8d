"""The learning-rate schedule is verl's, value by value (issue 15: warm-up starts at 0).

verl 0.9.1's FSDP engine (the one its actor and SFT trainer use) builds its scheduler with
`verl.utils.torch_functional.get_constant_schedule_with_warmup` or
`get_cosine_schedule_with_warmup`; the seed (a verl 0.5 fork) uses the same functions.
Three layers are compared for every step 0..total of each configuration:

- `lr_factor` against verl's schedule functions (both run through torch's LambdaLR);
- the native engine's scheduler (`build_scheduler`) against the same;
- the verl engine path: the `optim` section our config mapping composes, turned into verl's
  `FSDPOptimizerConfig` and handed to verl's own `FSDPEngine._build_lr_scheduler`.

Measured: the largest absolute difference is exactly 0.0 (the cosine is written the way
verl writes it, so the floating-point results are identical, not merely close).
"""

from __future__ import annotations

import types

import pytest
import torch

from psft.trainer.engine.optim import build_scheduler, lr_factor

pytest.importorskip("verl")

from verl.utils.torch_functional import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)

# (warm-up steps, total steps): no warm-up, one step, the seed's 10, and a warm-up that is
# longer than the run
CASES = [(0, 12), (1, 12), (10, 40), (10, 10), (10, 6), (0, 1), (1, 1), (3, 100)]
SCHEDULES = ("constant", "cosine")


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _values(scheduler: torch.optim.lr_scheduler.LRScheduler, total: int) -> list[float]:
    """The learning rate each step 0..total trains at (stepped once per step)."""
    values = []
    for _ in range(total + 1):
        values.append(scheduler.get_last_lr()[0])
        scheduler.step()
    return values


def verl_values(schedule: str, warmup: int, total: int) -> list[float]:
    if schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(_optimizer(), num_warmup_steps=warmup)
    else:
        scheduler = get_cosine_schedule_with_warmup(
            _optimizer(), num_warmup_steps=warmup, num_training_steps=total
        )
    return _values(scheduler, total)


def max_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("warmup", "total"), CASES)
def test_lr_factor_is_verls_schedule(schedule: str, warmup: int, total: int) -> None:
    ours = [
        lr_factor(s, warmup_steps=warmup, total_steps=total, schedule=schedule)
        for s in range(total + 1)
    ]
    assert max_abs_diff(ours, verl_values(schedule, warmup, total)) == 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("warmup", "total"), CASES)
def test_native_scheduler_is_verls_schedule(schedule: str, warmup: int, total: int) -> None:
    scheduler = build_scheduler(
        _optimizer(), warmup_steps=warmup, total_steps=total, schedule=schedule
    )
    assert max_abs_diff(_values(scheduler, total), verl_values(schedule, warmup, total)) == 0.0


def test_warm_up_starts_at_zero() -> None:
    # issue 15: step 0 used to train at peak/warmup; verl and the seed start at 0
    kw = {"warmup_steps": 4, "total_steps": 12, "schedule": "constant"}
    assert [lr_factor(s, **kw) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = {**kw, "schedule": "cosine"}
    assert lr_factor(0, **cosine) == 0.0
    assert lr_factor(4, **cosine) == 1.0 and lr_factor(8, **cosine) == pytest.approx(0.5)
    assert lr_factor(12, **cosine) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, warmup_steps=0, total_steps=3, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, warmup_steps=0, total_steps=3, schedule="linear")


def _job(schedule: str, warmup: int, total: int):
    from psft.workflows.spec import PSFTJob

    return PSFTJob.model_validate(
        {
            "metadata": {"name": "sched"},
            "spec": {
                "model": {"source": "m"},
                "dataset": {"train": ["t.jsonl"]},
                "psft": {
                    "batchSize": 8,
                    "miniBatchSize": 4,
                    "maxSteps": total,
                    "learningRate": 1e-3,
                    "lrScheduler": schedule,
                    "warmupSteps": warmup,
                },
                "resources": {"device": "cpu"},
            },
        }
    )


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("warmup", "total"), CASES)
def test_verl_engine_path_builds_the_same_schedule(schedule: str, warmup: int, total: int) -> None:
    """Our mapped verl config, through verl's own scheduler builder, gives the native
    engine's learning rates."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    from psft.trainer.verl.config import VerlInputs, build_config

    inputs = VerlInputs(
        model_path="/m", train_files=["/t.parquet"], checkpoint_dir="/c", device="cpu"
    )
    config = build_config(_job(schedule, warmup, total), inputs)
    optim = omega_conf_to_dataclass(config.optim)
    # what verl's SFT trainer does before the engine builds its optimizer and scheduler
    optim.total_training_steps = int(config.trainer.total_training_steps)
    peak = float(optim.lr)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    engine = types.SimpleNamespace(optimizer_config=optim, rank=1)  # rank 1: no print
    verl_scheduler = FSDPEngine._build_lr_scheduler(engine, optimizer)
    native = build_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak),
        warmup_steps=warmup,
        total_steps=total,
        schedule=schedule,
    )
    native_values = _values(native, total)
    assert max_abs_diff(_values(verl_scheduler, total), native_values) == 0.0
    assert native_values[0] == (0.0 if warmup else peak)
