"""PSFT on several nodes: verl's Ray single-controller SFT trainer with our PSFT steps.

verl 0.9.1's `verl.trainer.sft_trainer_ray.SFTTrainer` keeps the data loader in one driver
process and trains through a `RayWorkerGroup` of `TrainingWorker`s placed by Ray
(`RayResourcePool([per_node] * nodes)`: one placement group per node; verl's worker group
gives every worker RANK, WORLD_SIZE and the master address, and each worker starts the
process group). Its `train_batch` loop is plain SFT, but the worker API it drives also has
`infer_batch` and `train_mini_batch`, dispatched by data-parallel rank: that is all PSFT
needs, so `RayPSFTTrainer` runs the steps of `psft_trainer.PSFTSteps` (old log-probs of the
whole global batch, then miniBatchSize updates with `psft_engine_loss`) from the driver.

What the driver adds to verl's:
- rows of the global batch are laid out so that data-parallel rank r's k-th mini-batch is
  the r-th slice of the one-process run's k-th mini-batch (`dispatch_order`): the same
  updates as one process, whatever the number of workers;
- every call waits on all workers at once (`wait_all`), so a lost worker (node) fails the
  step at once with `WorkerLost`, instead of leaving the driver waiting on a survivor
  blocked in a collective;
- checkpoints go from each worker to the run's storage (S3 or a folder), and resume pulls
  each worker's own shards back (psft.trainer.verl.checkpoints);
- the exported Hugging Face model is gathered by the workers and published by rank 0.
"""

from __future__ import annotations

import json
import os
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch
from tensordict import TensorDict
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer.sft_trainer_ray import SFTTrainer as RaySFTTrainer
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import TrainingWorker

from psft.trainer.verl import checkpoints as ckpt
from psft.trainer.verl.psft_trainer import (
    LossSettings,
    PSFTSteps,
    StepCallback,
    dispatch_order,
    epoch_order_sampler,
    export_hf,
    psft_engine_loss,
)
from psft.workflows.errors import UserError


class WorkerLost(UserError):
    """A training worker (or its node) died, or a worker call failed."""


class WorkerStartFailed(UserError):
    """A training worker raised while it was being created: a setup error that a new
    attempt would repeat (not a lost node, so no "run it again")."""


LOST_GRACE_S = 10.0
"""After a worker call fails, how long the other calls may take to tell whether a worker
died: a peer's collective failing ("connection closed") is the symptom, the dead worker
the cause, and Ray reports the death a little later."""

DEATHS = (ray.exceptions.ActorDiedError, ray.exceptions.NodeDiedError)
PEER_LOST = re.compile(r"closed by peer|connection reset|remote worker crash", re.IGNORECASE)
"""How gloo and NCCL word a collective whose peer process is gone."""


def wait_all(refs: list[Any]) -> list[Any]:
    """ray.get of all `refs`, failing as soon as any of them fails (WorkerLost)."""
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
        return ray.get(list(refs))
    except ray.exceptions.RayError as exc:
        cause = root_cause(exc, pending)
        if getattr(cause, "actor_init_failed", False):
            raise WorkerStartFailed(worker_failure(cause)) from exc
        raise WorkerLost(worker_failure(cause)) from exc


def root_cause(first: BaseException, pending: list[Any]) -> BaseException:
    """The death of a worker among the calls still pending, if Ray reports one within
    LOST_GRACE_S; else the first failure."""
    if isinstance(first, DEATHS):
        return first
    deadline = time.monotonic() + LOST_GRACE_S
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1, timeout=deadline - time.monotonic())
        for ref in ready:
            try:
                ray.get(ref)
            except DEATHS as exc:
                return exc
            except ray.exceptions.RayError:
                continue
    return first


def worker_failure(exc: BaseException) -> str:
    """One line on a failed worker call: what happened, and the error in Ray's or the
    worker's words, cut short."""
    if getattr(exc, "actor_init_failed", False):
        what = "a training worker failed to start"
        cause: BaseException = exc
    elif isinstance(exc, DEATHS):
        what = "a training worker died (its node was lost, or the process was killed)"
        cause = exc
    elif isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        if PEER_LOST.search(str(cause)):
            what = "a training worker lost its peer (another worker or its node died)"
        else:
            what = "a training worker failed"
    else:
        what = "a training worker could not be reached"
        cause = exc
    text = " ".join(str(cause).split())
    return f"{what}: {type(cause).__name__}: {text[:300]}"


class PSFTTrainingWorker(TrainingWorker):
    """verl's TrainingWorker with what a PSFT run on Ray needs on each node: the CPU
    platform (tests), the learning rate in use, checkpoints to and from the run's storage,
    and the Hugging Face export."""

    def __init__(self, config, stage_config: str, checkpoints_key: str, checkpoint_dir: str):
        if os.environ.get("VERL_PLATFORM") == "cpu":
            from psft.trainer.verl import platform_cpu

            platform_cpu.install()
        from psft.trainer.verl.compat import skip_trl_value_head_patch
        from psft.trainer.verl.launch import _model_path
        from psft.workflows.stages import StageConfig

        skip_trl_value_head_patch()
        self._stage_config = stage_config
        self._store = None
        stage = StageConfig.model_validate_json(stage_config)
        # the model on this node (an s3:// source is fetched into the same cache path as
        # on the head), before verl's engine loads it from there
        local = str(_model_path(stage))
        if local != config.model_config.local_path:
            raise RuntimeError(
                f"the model is at {local} on this node but at "
                f"{config.model_config.local_path} on the Ray head: give every Ray pod the "
                "same PSFT_CACHE_DIR / PSFT_CACHE"
            )
        here = self._run_store().local_path(checkpoints_key)
        if str(here) != checkpoint_dir:
            raise RuntimeError(
                f"checkpoints would be written to {here} on this node but {checkpoint_dir} "
                "on the Ray head: give every Ray pod the same PSFT_CACHE_DIR"
            )
        super().__init__(config)

    def _run_store(self):
        if self._store is None:
            from psft.trainer.storage import open_run_store
            from psft.workflows.stages import StageConfig

            self._store = open_run_store(StageConfig.model_validate_json(self._stage_config))
        return self._store

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def placement(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "node_id": context.get_node_id(),
            "pid": os.getpid(),
        }

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def learning_rate(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def save_to_store(self, local_path: str, key: str, step: int, keep: int | None) -> list[str]:
        """verl's sharded save on this node, then this rank's files to the run's storage."""
        self.engine.save_checkpoint(local_path, None, step, keep)
        torch.distributed.barrier()
        store = self._run_store()
        files = ckpt.files_of(Path(local_path), self.rank)
        for rel in files:
            store.push(f"{key}/{rel}")
        return files

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def fetch_from_store(self, key: str, files: list[str]) -> int:
        """This rank's shards and the shared files of a checkpoint, onto this node."""
        store = self._run_store()
        needed = [rel for rel in files if ckpt.needed_by(rel, self.rank)]
        for rel in needed:
            store.pull(f"{key}/{rel}")
        return len(needed)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def export(self, final_key: str) -> None:
        """Gather the policy into a Hugging Face folder (rank 0) and publish it."""
        store = self._run_store()
        export_hf(
            self.engine.module,
            rank=self.rank,
            source_model=self.model_config.local_path,
            trust=bool(self.model_config.trust_remote_code),
            tokenizer=self.model_config.tokenizer,
            out_dir=str(store.local_path(final_key)),
        )
        if self.rank == 0:
            store.push(final_key)
        torch.distributed.barrier()


class RayPSFTTrainer(PSFTSteps, RaySFTTrainer):
    """The driver of a PSFT run on a Ray cluster (see the module docstring).

    `store` is the run's storage, `checkpoints_key` where verl's checkpoints live in it;
    `worker_env` is added to every worker's environment."""

    def __init__(
        self,
        config,
        *,
        stage_config: str,
        store: Any,
        checkpoints_key: str,
        on_step: StepCallback | None = None,
        worker_env: dict[str, str] | None = None,
        placement_groups: list[Any] | None = None,
    ):
        self.loss_settings = LossSettings.from_config(config.psft)
        self.mini_batch_size = int(config.psft.mini_batch_size)
        self.on_step = on_step
        self.stage_config = stage_config
        self.store = store
        self.checkpoints_key = checkpoints_key
        self.worker_env = dict(worker_env or {})
        self.placement_groups = placement_groups
        self.world = int(config.trainer.nnodes) * int(config.trainer.n_gpus_per_node)
        self.reports = True
        super().__init__(config)

    # construction ---------------------------------------------------------------------
    def _build_engine(self) -> None:
        from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
        from verl.workers.engine_workers import TrainingWorkerConfig

        config = TrainingWorkerConfig(
            model_type="language_model",
            model_config=self.model_config,
            engine_config=self.engine_config,
            optimizer_config=self.optimizer_config,
            checkpoint_config=self.checkpoint_config,
            profiler_config=self.profiler_config,
        )
        nodes, per_node = int(self.config.trainer.nnodes), int(self.config.trainer.n_gpus_per_node)
        # one worker group per bundle: each process reserves 1 CPU + 1 GPU. verl's default
        # (max_colocate_count 10, for colocated PPO roles) reserves 10 CPUs per GPU, which a
        # node pod with resources.cpu below 10 x gpusPerNode never offers: Ray would wait
        # for that placement forever
        self.resource_pool = RayResourcePool(
            process_on_nodes=[per_node] * nodes, max_colocate_count=1
        )
        if self.placement_groups is not None:
            # the groups the driver waited for (psft.trainer.verl.placement), same shape:
            # verl's pool uses groups it already holds instead of asking Ray again
            self.resource_pool.pgs = self.placement_groups
        worker = RayClassWithInitArgs(
            ray.remote(PSFTTrainingWorker),
            config=config,
            stage_config=self.stage_config,
            checkpoints_key=self.checkpoints_key,
            checkpoint_dir=str(self.config.trainer.default_local_dir),
        )
        self.training_client = RayWorkerGroup(
            resource_pool=self.resource_pool,
            ray_cls_with_init=worker,
            device_name=self.config.trainer.device,
            worker_env=self.worker_env,
        )
        self.placements = wait_all(self.training_client.placement())
        self.loss_fn = partial(psft_engine_loss, self.loss_settings)
        self.training_client.set_loss_fn(loss_fn=self.loss_fn)
        self.training_client.reset()

    def _build_dataloader(self) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader

        super()._build_dataloader()
        # the driver loads whole global batches, in the native engine's order
        self.train_sampler = epoch_order_sampler(
            self.config, self.train_dataset, self.global_batch_size, rank=0, world=1
        )
        self.train_dataloader = StatefulDataLoader(
            dataset=self.train_dataset,
            batch_size=self.global_batch_size,
            sampler=self.train_sampler,
            collate_fn=self.collate_fn,
            num_workers=0,
            pin_memory=False,
            drop_last=True,
        )
        self.val_dataloader = self.val_dataset or None
        self.steps_per_epoch = len(self.train_dataloader)

    def _build_ckpt_handler(self) -> None:
        self._fetch_checkpoint()
        super()._build_ckpt_handler()

    # PSFTSteps hooks ------------------------------------------------------------------
    def _result(self, output: Any) -> Any:
        from verl.protocol import DataProtoFuture

        if isinstance(output, DataProtoFuture):
            wait_all(output.futures)
            return output.get()
        if isinstance(output, list) and output and isinstance(output[0], ray.ObjectRef):
            return wait_all(output)
        return output

    def _learning_rate(self) -> float:
        return float(wait_all(self.training_client.learning_rate())[0])

    def _dispatch_order(self, data: TensorDict) -> TensorDict:
        order = dispatch_order(int(data.batch_size[0]), self.mini_batch_size, self.world)
        if order == sorted(order):
            return data
        return tu.index_select_tensor_dict(data, torch.tensor(order))

    def _validation_batches(self):
        """Held-out rows in batches of micro-batch x workers; the last one filled up to that
        size with copies of its first row whose loss mask is 0 (they add nothing to the
        sums)."""
        dataset = self.val_dataloader
        if dataset is None:
            return
        size = int(self.config.data.micro_batch_size_per_gpu) * self.world
        for start in range(0, len(dataset), size):
            items = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            while len(items) % size:  # verl splits each rank's rows in micro-batches
                filler = dict(items[0])
                filler["loss_mask"] = torch.zeros_like(filler["loss_mask"])
                items.append(filler)
            yield tu.get_tensordict(
                tensor_dict=self.collate_fn(items), non_tensor_dict=self._meta_info()
            )

    # checkpoints ----------------------------------------------------------------------
    def _local_dir(self) -> Path:
        return Path(self.config.trainer.default_local_dir)

    def _save(self, step: int) -> None:
        folder = self._local_dir() / ckpt.step_folder(step)
        key = f"{self.checkpoints_key}/{ckpt.step_folder(step)}"
        keep = self.config.trainer.max_ckpt_to_keep
        per_worker = wait_all(self.training_client.save_to_store(str(folder), key, step, keep))
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.train_dataloader.state_dict(), folder / "data_0.pt")
        self.store.push(f"{key}/data_0.pt")
        files = [f for listed in per_worker for f in listed] + ["data_0.pt"]
        (folder / ckpt.METADATA).write_text(
            json.dumps(ckpt.metadata(step, self.world, files), indent=2) + "\n"
        )
        self.store.push(f"{key}/{ckpt.METADATA}")
        tracker = self._local_dir() / ckpt.TRACKER
        tracker.with_suffix(".tmp").write_text(str(step))
        os.replace(tracker.with_suffix(".tmp"), tracker)
        self.store.push(f"{self.checkpoints_key}/{ckpt.TRACKER}")  # last: now complete
        print(f"checkpoint of step {step}: {self.store.root}/{key}", flush=True)
        ckpt.prune_store_or_warn(self.store, self.checkpoints_key, step, keep)

    def _fetch_checkpoint(self) -> None:
        """Bring the last complete checkpoint (if any) from the run's storage to the driver
        (data-loader state, tracker) and the workers (their shards); refuse one written by
        another number of processes."""
        tracker_key = f"{self.checkpoints_key}/{ckpt.TRACKER}"
        if not self.store.exists(tracker_key):
            return
        self.store.pull(tracker_key)
        step = ckpt.read_tracker(self._local_dir())
        if step is None:
            return
        key = f"{self.checkpoints_key}/{ckpt.step_folder(step)}"
        folder = self._local_dir() / ckpt.step_folder(step)
        if self.store.exists(f"{key}/{ckpt.METADATA}"):
            text = self.store.pull(f"{key}/{ckpt.METADATA}").read_text()
            meta = ckpt.parse_metadata(text, f"{self.store.root}/{key}/{ckpt.METADATA}")
        else:  # a checkpoint of the one-node launcher: its shard names tell
            self.store.pull(key)
            meta = {"world_size": ckpt.world_size_of(folder), "files": None}
        nodes, per_node = int(self.config.trainer.nnodes), int(self.config.trainer.n_gpus_per_node)
        ckpt.check_world_size(
            meta["world_size"], step, self.world, nodes, per_node, f"{self.store.root}/{key}"
        )
        files = meta["files"]
        if files is None:
            files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        if not files:
            raise UserError(
                f"{self.store.root}/{key}: the tracker names checkpoint step {step} but the "
                f"folder holds no files; delete {ckpt.TRACKER} there to start over, or restore "
                "the folder"
            )
        if "data_0.pt" in files:
            self.store.pull(f"{key}/data_0.pt")
        wait_all(self.training_client.fetch_from_store(key, files))

    def export(self, final_key: str) -> None:
        wait_all(self.training_client.export(final_key))
