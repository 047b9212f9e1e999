"""A worker's side of a checkpoint save: synchronous (every rank writes, then rank 0 marks it
complete) or asynchronous (a host snapshot, then Ray's upload thread; train/async_save.py), and
rank 0's files beside the shards. The protocol they follow is train/checkpoint.py's."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray.train

from modelfleet import storage as storage_io
from modelfleet.config import Config
from modelfleet.data.families import TRANSFORM_FILE
from modelfleet.models.lora import trainable_state
from modelfleet.storage import StorageLayout
from modelfleet.train import checkpoint as ck
from modelfleet.train import progress as pr
from modelfleet.train.async_save import BackgroundSave


def save_sync(
    engine: Any,
    cfg: Config,
    state: dict,
    metrics: dict,
    rank: int,
    world: int,
    verify: dict | None,
    *,
    adapter_only: bool = False,
) -> None:
    """Synchronous: shard + marker -> report (Ray merges dirs) -> barrier -> rank 0 writes COMPLETE."""
    import torch.distributed as dist

    step = state["step"]
    local = tempfile.mkdtemp(prefix=f"mf-ckpt-{step}-")
    try:
        if rank == 0:
            ck.remove_stale(StorageLayout(cfg.storage.path).runs(), cfg.storage.run_name, step)
        dist.barrier()
        engine.save_checkpoint(local, tag=ck.DS_TAG, exclude_frozen_parameters=adapter_only)
        if rank == 0:
            write_run_files(engine, cfg, state, metrics, world, verify, local, adapter_only=adapter_only)
        ck.write_rank_marker(local, rank, world, step)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=ck.step_dir_name(step)
        )
        dist.barrier()
        if rank == 0:
            ck.write_complete(StorageLayout(cfg.storage.path).runs(), cfg.storage.run_name, step, world)
        dist.barrier()
    finally:
        shutil.rmtree(local, ignore_errors=True)


def save_async(
    saver: BackgroundSave,
    engine: Any,
    cfg: Config,
    state: dict,
    metrics: dict,
    world: int,
    verify: dict | None,
    send: Callable[[pr.Progress], None],
    *,
    adapter_only: bool = False,
) -> float:
    """Asynchronous (train/async_save.py): snapshot to host memory, then Ray's upload thread writes,
    uploads and publishes. Returns the seconds spent waiting for the previous save."""
    step = state["step"]
    waited = saver.wait_previous()
    local = tempfile.mkdtemp(prefix=f"mf-ckpt-{step}-")  # Ray deletes it after the upload function
    if saver.rank == 0:
        # Before DeepSpeed's save_checkpoint, which starts with a barrier: no rank uploads into a
        # stale directory of this step (and every rank's previous save is published by then).
        ck.remove_stale(StorageLayout(cfg.storage.path).runs(), cfg.storage.run_name, step)
    t0 = time.monotonic()
    engine.save_checkpoint(local, tag=ck.DS_TAG, exclude_frozen_parameters=adapter_only)
    if saver.rank == 0:
        write_run_files(engine, cfg, state, metrics, world, verify, local, adapter_only=adapter_only)
    snapshot_s = time.monotonic() - t0

    def published(write_s: float, write_cpu_s: float) -> None:
        send(
            pr.Checkpoint(
                step=step,
                mode="async",
                snapshot_s=snapshot_s,
                write_s=write_s,
                write_cpu_s=write_cpu_s,
                waited_s=waited,
            )
        )

    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(local),
        checkpoint_dir_name=ck.step_dir_name(step),
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        checkpoint_upload_fn=saver.upload_fn(step, published),
        delete_local_checkpoint_after_upload=True,
    )
    return waited


def write_run_files(
    engine: Any,
    cfg: Config,
    state: dict,
    metrics: dict,
    world: int,
    verify: dict | None,
    local: str,
    *,
    adapter_only: bool,
) -> None:
    """Rank 0's files beside the shards: trainer state, ZeRO-0 weights, the probe, the transform."""
    from safetensors.torch import save_file, save_model

    with open(os.path.join(local, ck.TRAINER_STATE), "w") as f:
        json.dump({"state": state, "metrics": metrics, "world_size": world, "config": cfg.to_dict()}, f, indent=1)
    if cfg.deepspeed.zero_stage == 0:
        # ZeRO-0 keeps whole parameters in the module: export reads them from here
        # rather than unpickling DeepSpeed's model-states file.
        if adapter_only:
            save_file(trainable_state(engine.module), os.path.join(local, ck.ZERO0_WEIGHTS))
        else:
            save_model(engine.module, os.path.join(local, ck.ZERO0_WEIGHTS))
    if verify is not None:
        save_file(verify, os.path.join(local, ck.VERIFY_FILE))
    transform = storage_io.join(cfg.data.path, TRANSFORM_FILE)
    if storage_io.exists(transform):  # the fitted preprocessing travels with the weights
        storage_io.download_file(transform, os.path.join(local, TRANSFORM_FILE))
