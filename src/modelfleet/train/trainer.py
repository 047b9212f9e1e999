"""The driver side of training: the run. ``train(cfg)`` is what ``modelfleet train`` and
``jobs/train.py`` call: the checks (train/capacity.py), then Ray Train's TorchTrainer over the
worker loop (train/loop.py) with rank 0's progress coming back through the run's channel
(train/channel.py, train/sink.py), then the export.

Everything that can be checked before workers start (data, run name, cluster capacity) is checked
first, so bad input fails in seconds with one sentence and nothing already written is touched.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from modelfleet.cluster import connect
from modelfleet.cluster.local import gpus_are_simulated
from modelfleet.cluster.visibility import check_visible_everywhere
from modelfleet.config import Config
from modelfleet.data.raydata import configure_context
from modelfleet.errors import TrainingFailedError, TrainingStoppedError
from modelfleet.storage import StorageLayout, dump_json, read_json
from modelfleet.train import checkpoint as ck
from modelfleet.train.capacity import check_capacity, check_gpu_memory, preflight
from modelfleet.train.channel import start_channel
from modelfleet.train.export import export_checkpoint
from modelfleet.train.loop import train_loop_per_worker
from modelfleet.train.sink import ProgressSink
from modelfleet.train.stopping import StopRequest
from modelfleet.train.tracking import TrackingSummary


@dataclass
class TrainResult:
    run_name: str
    run_dir: str
    checkpoint_step: int | None
    metrics: dict[str, Any]
    artifact: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    tracking: TrackingSummary | None = None


TRAIN_POLL_INTERVAL_S = 0.5  # see train(): the controller's worker poll
PREEMPTION_POLL_INTERVAL_S = 1.0  # see train(): how often Ray Train looks for drained nodes


def train(
    cfg: Config, *, resume: str | None = None, export: bool = True, show_progress: bool = True, check_plan: bool = True
) -> TrainResult:
    """Run one training job on the connected (or a new local) Ray cluster. GPU workers start only
    if the memory plan fits their GPUs (``check_plan=False``: ``--no-plan``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t0 = time.time()
    preflight(cfg, resume=resume)
    if check_plan and cfg.train.gpu_memory_gib:
        check_gpu_memory(cfg)  # needs no cluster: refuse in seconds, before Ray starts
    connect()
    t_ray = time.time()
    check_capacity(cfg)
    # Before any worker: storage and data a worker on another node could not see fail here.
    check_visible_everywhere(cfg.storage.path, "storage.path")
    check_visible_everywhere(cfg.data.path, "data.path")
    if check_plan and not cfg.train.gpu_memory_gib:
        check_gpu_memory(cfg)
    layout = StorageLayout(cfg.storage.path)
    root, run_dir = layout.runs(), layout.run(cfg.storage.run_name)
    configure_context()
    # Ray Train's controller polls its workers every 2 s by default and takes several polls to
    # wind a finished group down: 5 s of every run's end on the 2-core machine, 1 s at 0.5 s. A
    # poll is one small RPC per worker. Read by the controller Ray starts below (Ray propagates
    # the variable from this process); a value the user set is kept.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_INTERVAL_S))
    # Ray Train polls Ray for drained nodes every 5 s by default: the ranks would train on for up
    # to 5 s past a drain notice before checkpointing. A poll is one GCS query.
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", str(PREEMPTION_POLL_INTERVAL_S))
    # Hard affinity to the driver's node: progress (and the stop flag) must outlive any worker
    # node a failure takes down (a soft preference may still place it on a worker node).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    channel = start_channel({"scheduling_strategy": here})  # progress in, the stop request out
    sink = ProgressSink(channel, cfg, run_dir, show_progress)
    # SIGTERM (`jobs stop`) or Ctrl-C during the fit: checkpoint at the next step, then end.
    stop = StopRequest(channel)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "channel": channel},
        torch_config=TorchConfig(backend="gloo") if cfg.train.use_gpu and gpus_are_simulated() else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=tuple(cfg.train.num_workers) if cfg.train.elastic else cfg.train.num_workers,
            elastic_resize_monitor_interval_s=cfg.train.elastic_resize_interval_s,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.storage.run_name,
            storage_path=root,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
        datasets={
            "train": ray.data.read_parquet(f"{cfg.data.path}/train"),
            "val": ray.data.read_parquet(f"{cfg.data.path}/val"),
        },
    )
    sink.start()
    failed = True
    try:
        with stop.on_signals():
            result = trainer.fit()
        failed = False
    except Exception as e:  # Ray wraps worker errors; surface the root cause in one line
        raise TrainingFailedError(_failure_message(cfg, root, e)) from e
    finally:
        sink.stop()
        ray.kill(channel)
        if failed:
            sink.tracker.close(failed=True)
    found, _ = ck.latest_complete(root, cfg.storage.run_name)
    res = TrainResult(
        run_name=cfg.storage.run_name,
        run_dir=run_dir,
        checkpoint_step=found.step if found else None,
        metrics=dict(result.metrics or {}),
        timings={"ray_connect_s": t_ray - t0, **sink.timings, "fit_s": time.time() - t_ray},
    )
    try:
        if stop.reason:
            raise TrainingStoppedError(_stopped_message(cfg, stop.reason, found))
        if export and found is not None:
            t_exp = time.time()
            res.artifact = export_checkpoint(found, run_name=cfg.storage.run_name)
            res.timings["export_s"] = time.time() - t_exp
            sink.tracker.artifact(res.artifact.uri, read_json(res.artifact.uri, "manifest.json")["weights_sha256"])
    finally:
        res.tracking = sink.tracker.close()
    res.timings["total_s"] = time.time() - t0
    dump_json(
        run_dir,
        "result.json",
        {
            "run": res.run_name,
            "step": res.checkpoint_step,
            "metrics": res.metrics,
            "artifact": res.artifact.uri if res.artifact else None,
            "timings": res.timings,
            "tracking": asdict(res.tracking) if res.tracking else None,
        },
    )
    return res


def _stopped_message(cfg: Config, reason: str, found: ck.CheckpointInfo | None) -> str:
    name = cfg.storage.run_name
    where = (
        f"its checkpoint at step {found.step} is complete; continue it with --resume {name}"
        if found
        else "it left no complete checkpoint"
    )
    return f"training run {name!r} stopped ({reason}): {where}"


def _failure_message(cfg: Config, root: str, e: BaseException) -> str:
    """What failed, that the restart budget is spent, and where a resubmission would resume."""
    name, budget = cfg.storage.run_name, cfg.train.max_failures
    found, _ = ck.latest_complete(root, name)
    where = (
        f"its last complete checkpoint is step {found.step}; continue it with --resume {name} once the cause is fixed"
        if found
        else "it left no complete checkpoint"
    )
    return (
        f"training run {name!r} failed and train.max_failures={budget} allows no more restarts: "
        f"{_root_cause(e)}; {where}"
    )


def _root_cause(e: BaseException) -> str:
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__
