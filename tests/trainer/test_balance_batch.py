"""psft.balanceBatch: the seed's length-balanced partitions, as mini-batches (issue 15)."""

from __future__ import annotations

import random

import pytest

from psft.trainer.engine.balance import balanced_order, balanced_partitions, spread
from psft.trainer.engine.loop import step_indices
from psft.workflows.spec import PSFTSpec


def random_cases(n_cases: int = 300):
    rng = random.Random(0)
    for _ in range(n_cases):
        k = rng.choice([1, 2, 3, 4, 8])
        n = k * rng.randint(1, 8)
        yield [rng.randint(10, 36_000) for _ in range(n)], k


def test_partitions_are_equal_sized_and_cover_every_index_once() -> None:
    for lengths, k in random_cases():
        parts = balanced_partitions(lengths, k)
        assert len(parts) == k
        assert {len(p) for p in parts} == {len(lengths) // k}
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        assert all(p == sorted(p) for p in parts)


def test_balanced_at_least_as_well_as_verls_karmarkar_karp() -> None:
    seqlen = pytest.importorskip("verl.utils.seqlen_balancing")
    for lengths, k in random_cases():
        ours = balanced_order(lengths, k)
        theirs = [i for p in seqlen.get_seqlen_balanced_partitions(lengths, k, True) for i in p]
        assert spread(lengths, k, ours) <= spread(lengths, k, theirs)


def test_known_case_is_perfectly_balanced() -> None:
    # 8 + 1 = 7 + 2 = 6 + 3 = 5 + 4: contiguous pairs spread 12, balanced pairs 0
    lengths = [8, 7, 6, 5, 4, 3, 2, 1]
    assert spread(lengths, 4) == 12
    assert spread(lengths, 4, balanced_order(lengths, 4)) == 0


def test_uneven_split_is_refused() -> None:
    with pytest.raises(ValueError, match="equal partitions"):
        balanced_partitions([1, 2, 3], 2)


def spec(balance: bool, **kw) -> PSFTSpec:
    values = {"batch_size": 8, "mini_batch_size": 2, "micro_batch_size": 1, "seed": 3, **kw}
    return PSFTSpec(balance_batch=balance, **values)


@pytest.mark.parametrize("shuffle", [True, False])
def test_balancing_changes_the_order_within_a_step_only(shuffle: bool) -> None:
    rng = random.Random(1)
    lengths = [rng.randint(20, 900) for _ in range(37)]  # 4 steps per epoch, 5 rows dropped
    changed = 0
    for step in range(12):  # three epochs
        on = step_indices(lengths, step, spec(True), shuffle=shuffle)
        off = step_indices(lengths, step, spec(False), shuffle=shuffle)
        assert sorted(on) == sorted(off)  # the same rows in every step
        on_spread = spread([lengths[i] for i in on], 4)
        off_spread = spread([lengths[i] for i in off], 4)
        assert on_spread <= off_spread
        changed += on != off
    assert changed >= 10  # it does reorder


def test_one_update_per_step_is_left_alone() -> None:
    lengths = list(range(100, 132))
    for step in range(4):
        assert step_indices(lengths, step, spec(True, mini_batch_size=8), shuffle=True) == (
            step_indices(lengths, step, spec(False, mini_batch_size=8), shuffle=True)
        )


def test_default_is_on_as_in_the_seed() -> None:
    assert PSFTSpec().balance_batch is True


def test_token_budget_micro_batches_keep_order_and_fit_the_budget() -> None:
    from psft.trainer.data import Example
    from psft.trainer.engine.loop import micro_batches

    rows = [Example(id=str(i), prompt=[], demonstration="", input_ids=[0] * n)
            for i, n in enumerate([300, 500, 200, 900, 100, 100, 1000])]  # fmt: skip
    budget = spec(True, max_tokens_per_micro_batch=1000)
    micros = micro_batches(rows, budget)
    assert [[r.id for r in m] for m in micros] == [["0", "1", "2"], ["3", "4"], ["5"], ["6"]]
    assert all(sum(len(r.input_ids) for r in m) <= 1000 for m in micros)
    # without a budget: microBatchSize demonstrations each
    assert [len(m) for m in micro_batches(rows, spec(True))] == [1] * 7


def test_a_budget_below_the_longest_demonstration_is_refused() -> None:
    from psft.workflows.validate import InvalidJob, validate_job

    doc = {
        "metadata": {"name": "t"},
        "spec": {
            "model": {"source": "m"},
            "dataset": {"train": ["d.jsonl"], "maxPromptLength": 2048,
                        "maxResponseLength": 36864},
            "psft": {"maxTokensPerMicroBatch": 32768},
        },
    }  # fmt: skip
    with pytest.raises(InvalidJob) as info:
        validate_job(doc)
    assert [e.path for e in info.value.errors] == ["spec.psft.maxTokensPerMicroBatch"]
    assert "38912" in info.value.errors[0].message
    doc["spec"]["psft"]["maxTokensPerMicroBatch"] = 38912  # the seed's budget fits exactly
    assert validate_job(doc).spec.psft.max_tokens_per_micro_batch == 38912


def test_the_verl_engines_sampler_yields_the_native_engines_order() -> None:
    pytest.importorskip("verl")
    from psft.trainer.verl.psft_trainer import EpochOrderSampler

    rng = random.Random(2)
    lengths = [rng.randint(20, 900) for _ in range(37)]
    s = spec(True)
    sampler = EpochOrderSampler(
        len(lengths), batch_size=8, seed=3, shuffle=True, rank=0, world=1,
        lengths=lengths, updates_per_step=s.updates_per_step,
    )  # fmt: skip
    sampler.set_epoch(1)
    native = [i for step in range(4, 8) for i in step_indices(lengths, step, s, shuffle=True)]
    assert list(sampler) == native


def test_each_rank_updates_on_its_slice_of_the_same_mini_batches() -> None:
    """verl gives rank r a contiguous share of the batch and cuts it into mini/world-row
    updates: with 2 ranks, update k of both ranks together is the one-process k-th
    mini-batch (balanced or not)."""
    pytest.importorskip("verl")
    from psft.trainer.verl.psft_trainer import EpochOrderSampler

    rng = random.Random(5)
    lengths = [rng.randint(20, 900) for _ in range(40)]
    batch, updates, world = 8, 2, 2
    for balanced in (None, lengths):
        common = dict(batch_size=batch, seed=3, shuffle=True, lengths=balanced)
        one = list(EpochOrderSampler(40, rank=0, world=1, updates_per_step=updates, **common))
        ranks = [
            list(EpochOrderSampler(40, rank=r, world=world, updates_per_step=updates, **common))
            for r in range(world)
        ]
        per_update = batch // updates // world
        for step in range(40 // batch):
            for k in range(updates):
                got = [
                    row
                    for rows in ranks
                    for row in rows[step * batch // world :][k * per_update : (k + 1) * per_update]
                ]
                want = one[step * batch + k * batch // updates :][: batch // updates]
                assert got == want, (balanced is not None, step, k)
