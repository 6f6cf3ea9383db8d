"""The pieces of the multi-node (Ray) path that need no cluster: the batch layout over
data-parallel ranks, which checkpoint files a rank owns, the world-size rule and the
wording of a lost worker. tests/multinode runs the whole path on a real Ray cluster."""

from __future__ import annotations

import json

import pytest

from psft.workflows.errors import UserError

pytest.importorskip("verl")
pytest.importorskip("ray")


@pytest.mark.parametrize(("batch", "mini", "world"), [(8, 4, 2), (16, 8, 4), (12, 6, 3), (8, 8, 1)])
def test_each_update_sees_the_rows_of_one_process(batch, mini, world):
    from psft.trainer.verl.ray_trainer import dispatch_order

    order = dispatch_order(batch, mini, world)
    assert sorted(order) == list(range(batch))
    chunk, per_rank = batch // world, mini // world
    ranks = [order[r * chunk : (r + 1) * chunk] for r in range(world)]  # verl's split
    for k in range(batch // mini):  # update k: the k-th mini-batch of every rank
        rows = [row for rank in ranks for row in rank[k * per_rank : (k + 1) * per_rank]]
        assert rows == list(range(k * mini, (k + 1) * mini))


def test_checkpoint_files_by_rank(tmp_path):
    from psft.trainer.verl import checkpoints as ckpt

    folder = tmp_path / "global_step_4"
    for name in (
        "model_world_size_2_rank_0.pt",
        "model_world_size_2_rank_1.pt",
        "optim_world_size_2_rank_1.pt",
        "fsdp_config.json",
        "huggingface/config.json",
        "data_0.pt",
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    assert ckpt.files_of(folder, 0) == [
        "fsdp_config.json",
        "huggingface/config.json",
        "model_world_size_2_rank_0.pt",
    ]
    assert ckpt.files_of(folder, 1) == [
        "model_world_size_2_rank_1.pt",
        "optim_world_size_2_rank_1.pt",
    ]
    assert ckpt.needed_by("huggingface/config.json", 1)
    assert not ckpt.needed_by("model_world_size_2_rank_0.pt", 1)
    assert ckpt.world_size_of(folder) == 2  # from the shard names (one-node checkpoints)
    (folder / ckpt.METADATA).write_text(json.dumps(ckpt.metadata(4, 8, [])))
    assert ckpt.world_size_of(folder) == 8  # the metadata wins


def test_another_world_size_is_a_user_error_naming_the_field():
    from psft.trainer.verl.checkpoints import check_world_size

    check_world_size(16, 40, 16, 2, 8, "s3://b/run/train/verl/checkpoints/global_step_40")
    with pytest.raises(UserError, match=r"^spec\.resources\.nodes: .* written by 32 ") as e:
        check_world_size(32, 40, 16, 2, 8, "s3://b/run/train/verl/checkpoints/global_step_40")
    assert "nodes x gpusPerNode = 32" in str(e.value) and "psft run --fresh" in str(e.value)
    with pytest.raises(UserError, match=r"^spec\.resources\.gpusPerNode: "):
        check_world_size(12, 40, 16, 2, 8, "somewhere")


def test_a_lost_worker_is_worded_by_its_cause():
    import ray

    from psft.trainer.verl.ray_trainer import worker_failure

    died = ray.exceptions.ActorDiedError()
    assert worker_failure(died).startswith("a training worker died (its node was lost")
    peer = ray.exceptions.RayTaskError(
        "infer_batch",
        "Traceback ...",
        RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.2]:22183"),
    )
    assert worker_failure(peer).startswith(
        "a training worker lost its peer (another worker or its node died): RuntimeError: "
    )
    init = ray.exceptions.RayTaskError(
        "PSFTTrainingWorker.__init__", "Traceback ...", RuntimeError("model cache differs")
    )
    failed_start = ray.exceptions.ActorDiedError(init)  # how Ray reports an __init__ error
    assert failed_start.actor_init_failed
    assert worker_failure(failed_start).startswith("a training worker failed to start")


def test_a_damaged_checkpoint_record_is_a_clear_error(tmp_path) -> None:
    from psft.trainer.verl import checkpoints as ckpt
    from psft.workflows.errors import UserError

    good = json.dumps(ckpt.metadata(4, 2, ["a.pt"]))
    assert ckpt.parse_metadata(good, "x") == {"world_size": 2, "files": ["a.pt"]}
    for bad in (
        "{",
        "[]",
        '{"step": 4}',
        '{"world_size": "two"}',
        '{"world_size": 2, "files": "a.pt"}',
    ):
        with pytest.raises(UserError) as info:
            ckpt.parse_metadata(
                bad, "s3://b/run/train/checkpoints/global_step_4/psft_checkpoint.json"
            )
        assert "global_step_4/psft_checkpoint.json" in str(info.value)
        assert "--fresh" in str(info.value)
    folder = tmp_path / "global_step_4"
    folder.mkdir()
    (folder / ckpt.METADATA).write_text('{"world_size": 2')  # torn
    with pytest.raises(UserError):
        ckpt.world_size_of(folder)


def _node(address: str, cpu: float, gpu: float = 0.0, alive: bool = True) -> dict:
    resources = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return {"Alive": alive, "NodeManagerAddress": address, "Resources": resources}


@pytest.mark.parametrize(
    ("nodes", "per_node", "expected"),
    [
        # 2 groups of 4 GPU workers: the 8-GPU node holds two, the 4-GPU node one
        ([_node("a", 16, 8), _node("b", 8, 4)], 4, 3),
        # CPUs bound it too: 4 GPUs but 2 CPUs hold no group of 4
        ([_node("a", 2, 4)], 4, 0),
        # a dead node holds nothing, a CPU-only node no GPU group
        ([_node("a", 8, 4, alive=False), _node("b", 64)], 4, 0),
    ],
)
def test_the_groups_a_cluster_can_hold(nodes, per_node, expected):
    from psft.trainer.verl.placement import Shape, capacity

    assert capacity(Shape(nodes=2, per_node=per_node, gpu=True), nodes) == expected


def test_cpu_groups_need_only_cpus():
    from psft.trainer.verl.placement import Shape, capacity

    shape = Shape(nodes=2, per_node=1, gpu=False)
    assert shape.bundle == {"CPU": 1.0}
    assert capacity(shape, [_node("a", 1), _node("b", 3)]) == 4


def test_a_cluster_too_small_is_an_error_naming_the_fields_and_what_it_has():
    from psft.trainer.verl.placement import TIMEOUT_ENV, Shape, too_small, waiting_line

    shape = Shape(nodes=2, per_node=4, gpu=True)
    nodes = [_node("10.0.0.5", 16, 4), _node("10.0.0.6", 2, 4)]
    message = too_small(shape, nodes, 600.4, "10.0.0.5:6379")
    assert message.startswith("spec.resources.nodes x gpusPerNode: the run needs 2 groups of 4")
    assert "lower spec.resources.nodes / gpusPerNode;" in message
    assert "after 600 s the Ray cluster at 10.0.0.5:6379 can hold 1" in message
    assert "10.0.0.5: 16 CPU, 4 GPU; 10.0.0.6: 2 CPU, 4 GPU" in message
    assert TIMEOUT_ENV in message
    assert "1 can fit on the nodes that joined so far" in waiting_line(shape, nodes, 31)
    busy = waiting_line(shape, [_node("a", 16, 8)], 31)
    assert "the cluster could hold them; its resources are in use" in busy


@pytest.mark.parametrize("raw", ["ten", "-1"])
def test_a_bad_placement_timeout_is_a_clear_error(raw, monkeypatch):
    from psft.trainer.verl.placement import TIMEOUT_ENV, placement_timeout

    monkeypatch.setenv(TIMEOUT_ENV, raw)
    with pytest.raises(UserError, match=rf"^{TIMEOUT_ENV}='{raw}': not a number of seconds"):
        placement_timeout()
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert placement_timeout() == 90
    monkeypatch.delenv(TIMEOUT_ENV)
    assert placement_timeout() == 600


def test_prune_store_keeps_the_newest_and_any_upload_in_progress(tmp_path):
    from psft.trainer.storage.local import LocalRunStore
    from psft.trainer.verl.checkpoints import prune_store

    store = LocalRunStore(tmp_path)
    key = "train/verl/checkpoints"
    for name in ("global_step_2", "global_step_4", "global_step_6", "global_step_8", "other"):
        (store.local_path(key) / name).mkdir(parents=True)
    # step 8 is above the tracker's step 6: an upload in progress, not pruned
    assert prune_store(store, key, latest=6, keep=1) == [2, 4]
    assert store.folders(key) == ["global_step_6", "global_step_8", "other"]
