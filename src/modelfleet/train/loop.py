"""The per-worker training loop: Ray Data shard -> DeepSpeed engine -> metrics and checkpoints.

Runs inside each Ray Train worker. It reads only the Config passed in ``train_loop_config``;
``deepspeed`` is imported here (not at module import) so the driver never needs an accelerator.

Device rule (the same code runs under gloo on CPU and NCCL on GPU): every tensor that crosses a
collective lives on ``engine.device`` (``collectives.all_reduce`` refuses any other), and losses
accumulate on the device (``LossMeter``) and reach the host (``collectives.to_host``) only at
``log_every``, evaluation and checkpoints, never per micro-step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray.train

from modelfleet import storage as storage_io
from modelfleet.config import Config
from modelfleet.data.families import TRANSFORM_FILE
from modelfleet.families import build_model, get_family
from modelfleet.models.lora import trainable_state
from modelfleet.raycompat import train_storage
from modelfleet.storage import StorageLayout
from modelfleet.train import checkpoint as ck
from modelfleet.train import pickles
from modelfleet.train import progress as pr
from modelfleet.train.async_save import BackgroundSave
from modelfleet.train.collectives import LossMeter, all_reduce, to_host
from modelfleet.train.deepspeed import build_ds_config, lr_lambda, skip_cpu_inference_comm_op, skip_muon_import
from modelfleet.train.stopping import StopWatch
from modelfleet.train.throughput import Peak, device_peak, lm_dims, model_flops_per_token, step_rates


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


class _Progress:
    """Sends rank 0's progress records (train/progress.py) to the driver's channel
    (train/channel.py) without ever blocking training on it."""

    def __init__(self, channel: Any, rank: int) -> None:
        self.channel = channel if rank == 0 else None

    def send(self, record: pr.Progress) -> None:
        if self.channel is None:
            return
        record.time = time.time()
        try:
            self.channel.put.remote(pr.pack(record))
        except Exception:  # a progress line is never worth a failed training step
            pass


_FRESH = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_in_epoch": 0}
"""The data position and step of a run that starts from no checkpoint."""


@dataclass
class _Worker:
    """This worker's place in the group, and what it reports with."""

    cfg: Config
    rank: int
    world: int
    on_gpu: bool
    family: Any
    """The model family: collation, loss and the export probe."""
    channel: Any
    progress: _Progress
    t_start: float


@dataclass
class _Engine:
    engine: Any
    saver: BackgroundSave | None
    """Async checkpoints (``train.checkpoint_mode: async``); None: synchronous."""
    adapter_only: bool
    """LoRA: only the adapter trains and is checkpointed; the frozen base is the base artifact."""
    t_init: float


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What Ray Train runs on every worker: start, find the latest complete checkpoint, build the
    engine, restore, train."""
    w = _start_worker(Config.from_dict(loop_config["config"]), loop_config.get("channel"))
    found, skipped = ck.latest_complete(StorageLayout(w.cfg.storage.path).runs(), w.cfg.storage.run_name)
    # A checkpoint written by another number of ranks (an elastic resize, or a resume with another
    # train.num_workers) is re-partitioned through DeepSpeed's universal format (ZeRO-0 holds whole
    # states and loads as it is).
    resized_from = ck.saved_world(found) if found is not None else w.world
    convert = resized_from != w.world and w.cfg.deepspeed.zero_stage >= 1
    e = _build_engine(w, convert)
    state = dict(_FRESH) if found is None else _restore(w, e, found, skipped, resized_from, convert)
    _StepLoop(w, e, state, resized_from).run()


def _start_worker(cfg: Config, channel: Any) -> _Worker:
    import torch

    # A simulated GPU (logical, on a CPU node) computes on CPU with DeepSpeed's CPU accelerator.
    on_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")
    skip_muon_import()
    if not on_gpu:
        skip_cpu_inference_comm_op()
    t_start = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not on_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    family = get_family(cfg.model.family)
    return _Worker(cfg, rank, world, on_gpu, family, channel, _Progress(channel, rank), t_start)


def _build_engine(w: _Worker, convert: bool) -> _Engine:
    """The DeepSpeed engine (and the async saver) of this worker; rank 0 reports it ``built``."""
    import deepspeed
    import torch

    cfg = w.cfg
    ds_config = build_ds_config(cfg, w.world)
    if convert:
        ds_config["checkpoint"] = {"load_universal": True}
    torch.manual_seed(cfg.train.seed)
    sharded = cfg.deepspeed.zero_stage == 3
    model = w.family.build_sharded(cfg.model, ds_config) if sharded else build_model(cfg.model)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    storage = param_storage(model)
    # LoRA: only the adapter trains; the frozen base gets no optimizer state and is left out of
    # checkpoints (it is the base artifact, read again on resume and export).
    adapter_only = w.family.lora_params(cfg.model) is not None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    t_init = time.time()
    saver = (
        BackgroundSave(
            engine,
            rank=w.rank,
            world=w.world,
            runs_root=StorageLayout(cfg.storage.path).runs(),
            run_name=cfg.storage.run_name,
            storage=train_storage(),
        )
        if cfg.train.checkpoint_mode == "async"
        else None
    )
    largest_local = all_reduce(
        torch.tensor([storage["local_bytes"]], dtype=torch.float64, device=engine.device),
        engine.device,
        torch.distributed.ReduceOp.MAX,
    )
    w.progress.send(
        pr.Built(
            sharded=sharded,
            world=w.world,
            full_bytes=storage["full_bytes"],
            max_local_bytes=int(to_host(largest_local)[0]),
            transient_bytes=storage["transient_bytes"],
        )
    )
    return _Engine(engine, saver, adapter_only, t_init)


def _restore(
    w: _Worker, e: _Engine, found: ck.CheckpointInfo, skipped: list[str], resized_from: int, convert: bool
) -> dict[str, Any]:
    """Load ``found`` into the engine (re-partitioned when ``convert``); its data position and step."""
    t_load = time.time()
    scratch = tempfile.mkdtemp(prefix="mf-restore-")
    local = ck.download(found, scratch)
    with pickles.weights_only_loads(f"checkpoint {found.uri}"):  # files may change after the scan
        if convert:
            universal = ck.to_universal(local, tempfile.mkdtemp(prefix="mf-universal-"))
            e.engine.load_checkpoint(universal, tag=ck.UNIVERSAL_TAG, load_module_strict=not e.adapter_only)
            shutil.rmtree(universal, ignore_errors=True)
        else:
            e.engine.load_checkpoint(local, tag=ck.DS_TAG, load_module_strict=not e.adapter_only)
    with open(os.path.join(local, ck.TRAINER_STATE)) as f:
        state = {"samples_in_epoch": 0, **json.load(f)["state"]}
    w.progress.send(pr.Resume(step=state["step"], skipped=skipped))
    if resized_from != w.world:
        w.progress.send(
            pr.Reshard(
                step=state["step"],
                from_workers=resized_from,
                to_workers=w.world,
                grad_accum=w.cfg.train.grad_accum_at(w.world),
                restore_s=round(time.time() - t_load, 3),
                max_abs_logit_diff=_restored_logit_diff(e.engine, w.family, local),
            )
        )
    # A downloaded copy (object stores) goes; a local checkpoint is read in place, and the
    # empty directory made for a download goes with it.
    shutil.rmtree(local if local != found.uri else scratch, ignore_errors=True)
    return state


class _StepLoop:
    """The epochs and optimizer steps of one worker group, from ``state`` to ``train.max_steps``:
    log, evaluate, checkpoint, and stop or drain when asked."""

    def __init__(self, w: _Worker, e: _Engine, state: dict[str, Any], resized_from: int) -> None:
        cfg, family, engine = w.cfg, w.family, e.engine
        self.w, self.e, self.state, self.resized_from = w, e, state, resized_from
        self.t = cfg.train
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        self.mbs, self.ga = cfg.train.micro_batch_size, cfg.train.grad_accum_at(w.world)
        self.samples_per_step = self.mbs * self.ga * w.world
        lm = family.task == "lm"  # tokens, model FLOPs and MFU; the other families count samples
        self.tokens_per_step = self.samples_per_step * family.units_per_sample(cfg) if lm else None
        self.flops_per_token = (
            model_flops_per_token(engine.module, *lm_dims(engine.module, cfg), family.units_per_sample(cfg))
            if lm
            else None
        )
        # Only rank 0 reports; the CPU peak is a GEMM timed here, once, before the first step.
        self.peak = (
            device_peak(self.t.peak_tflops, self.t.precision, w.on_gpu) if w.rank == 0 and lm else Peak(None, "none")
        )
        self.step, self.micro = state["step"], 0
        self.watch, self.stopped = StopWatch(w.channel, w.rank), False
        self.meter = LossMeter(engine.device, w.world)
        self.last = time.time()
        self.first_step_done = False
        self.val_batches: list[Any] | None = None  # read once: each Ray Data pass costs seconds to start
        # Small-table families train for many short epochs; a Ray Data pass costs seconds to start,
        # so they keep this worker's shard from the first pass in memory for the epochs after it.
        self.cached: list[Any] | None = [] if family.cache_epochs else None

    def run(self) -> None:
        while self.step < self.t.max_steps:
            self._epoch()
            if self.stopped:
                break
            if self.step < self.t.max_steps:
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = self.state["samples_in_epoch"] = 0
                self.resized_from = self.w.world
        if self.e.saver is not None:  # the last save published before the run counts as done
            self.e.saver.wait_previous()
        self.w.progress.send(
            pr.Done(
                step=self.step,
                elapsed_s=time.time() - self.w.t_start,
                drain_checks=self.watch.checks,
                drain_check_mean_s=self.watch.check_s / max(self.watch.checks, 1),
            )
        )

    def _epoch(self) -> None:
        """One pass over this worker's shard (from the restored data position), or to the end."""
        mbs, world, state = self.mbs, self.w.world, self.state
        # The data position is global (samples of this epoch seen by all ranks), so it survives a
        # change in the number of ranks; a checkpoint from before it had only the per-rank count.
        seen = state["samples_in_epoch"] or state["batch_in_epoch"] * mbs * self.resized_from
        skip, n_batches = seen // (mbs * world), 0
        cached = self.cached
        batches = (
            cached
            if cached
            else self.train_shard.iter_batches(batch_size=mbs, drop_last=True, batch_format="numpy", prefetch_batches=2)
        )
        for i, batch in enumerate(batches):
            if cached is not None and batches is not cached:
                cached.append(batch)
            n_batches += 1
            if i < skip:  # resume at the same data position inside the epoch
                continue
            micro_step(self.e.engine, self.w.family, batch, self.meter)
            self.micro += 1
            state["batch_in_epoch"] = i + 1
            state["samples_in_epoch"] = (i + 1) * mbs * world
            if self.micro % self.ga:
                continue
            if self._optimizer_step_done():
                break
        if n_batches == 0:
            raise RuntimeError(
                "data: this worker's train shard is empty; the train split has fewer "
                "rows than train.micro_batch_size x train.num_workers"
            )

    def _optimizer_step_done(self) -> bool:
        """After each optimizer step: log, evaluate, checkpoint, stop or drain. True: the epoch
        ends here (the last step, or a stop)."""
        t, engine, progress = self.t, self.e.engine, self.w.progress
        self.step += 1
        step = self.state["step"] = self.step
        step_loss = self.meter.reduce(self.watch.vote())  # on the device: no host sync unless read below
        now = time.time()
        final = step == t.max_steps
        loss_value: Any = None
        halt: pr.Stopped | pr.Preempted | None = None
        if step % t.log_every == 0 or final:
            loss_value = to_host(step_loss)
            halt = None if final else _halt(self.watch, self.meter)
            progress.send(self._step_record(step, loss_value, now))
        if not self.first_step_done:
            self.first_step_done = True
            progress.send(pr.FirstStep(init_s=self.e.t_init - self.w.t_start, first_step_s=now - self.w.t_start))
        self.last = now
        evaluate = (t.eval_every and step % t.eval_every == 0) or final
        save = (t.checkpoint_every and step % t.checkpoint_every == 0) or final or halt is not None
        if not (evaluate or save):
            return False
        metrics: dict[str, Any] = {"step": step, "loss": loss_value if loss_value is not None else to_host(step_loss)}
        if evaluate:
            val_loss = _evaluate(engine, self._val_batches(), self.w.family)
            metrics.update(val_loss=val_loss, val_ppl=float(np.exp(min(val_loss, 50.0))))
            progress.send(pr.Eval(step=step, val_loss=val_loss, val_ppl=metrics["val_ppl"]))
        if save:
            self._save(metrics)
        if halt is not None:
            if self.e.saver is not None:
                self.e.saver.wait_previous()  # published before anyone reads the record
            halt.step = step
            progress.send(halt)
            if isinstance(halt, pr.Stopped):
                self.stopped = True
                return True
            self.watch.idle_while_draining()  # until Ray Train tears the group down at the deadline
            progress.send(pr.DrainCancelled(step=step))
        self.last = time.time()  # eval and checkpoint time is not step time
        return final

    def _step_record(self, step: int, loss: Any, now: float) -> pr.Step:
        rates = step_rates(
            step_time_s=now - self.last,
            samples=self.samples_per_step,
            tokens=self.tokens_per_step,
            flops_per_token=self.flops_per_token,
            world=self.w.world,
            peak=self.peak,
            device=self.e.engine.device,
        )
        return pr.Step(
            step=step,
            max_steps=self.t.max_steps,
            loss=loss,
            lr=self.e.engine.get_lr()[0],
            grad_norm=_grad_norm(self.e.engine),
            **asdict(rates),
            elapsed_s=now - self.w.t_start,
            epoch=self.state["epoch"],
        )

    def _val_batches(self) -> list[Any]:
        if self.val_batches is None:
            self.val_batches = list(_eval_batches(self.val_shard, self.w.cfg, self.w.family))
        return self.val_batches

    def _save(self, metrics: dict[str, Any]) -> None:
        w, e = self.w, self.e
        # Every checkpoint carries the probe (one forward on a fixed batch): a resize that
        # restores any of them checks the restored logits, and any of them can be exported.
        verify = _probe(e.engine, self._val_batches(), w.family)
        t_save = time.monotonic()
        if e.saver is None:
            _save(e.engine, w.cfg, self.state, metrics, w.rank, w.world, verify, adapter_only=e.adapter_only)
            w.progress.send(pr.Checkpoint(step=self.step, mode="sync"))
        else:  # its "checkpoint" record is sent by rank 0 once it is published
            _save_async(
                e.saver, e.engine, w.cfg, self.state, metrics, w.world, verify, w.progress, adapter_only=e.adapter_only
            )
        # How long the step loop stopped for this save (the figure async saves cut).
        w.progress.send(pr.Save(step=self.step, mode=w.cfg.train.checkpoint_mode, stall_s=time.monotonic() - t_save))


def _halt(watch: StopWatch, meter: LossMeter) -> pr.Stopped | pr.Preempted | None:
    """At a log step: ``Stopped`` when rank 0 voted for the driver's stop request in this step's
    all-reduce, ``Preempted`` on a drain notice (every rank calls this at the same steps: the
    notice is a collective), else None. The step is set where the record is sent."""
    if to_host(meter.votes) > 0:
        return pr.Stopped(step=0, reason=watch.reason or "stop requested")
    info = watch.preemption()
    if info is not None:
        return pr.Preempted(step=0, deadline_ms=info.deadline_ms, ranks=list(info.preempted_ranks))
    return None


def _grad_norm(engine: Any) -> float | None:
    """The global gradient norm of the last optimizer step (before clipping), as DeepSpeed computed
    it; None where DeepSpeed keeps none (ZeRO-0 without gradient clipping)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def param_storage(model: Any) -> dict[str, int]:
    """Bytes of parameter storage this rank holds (ZeRO-3 partitions count their shard), of the
    whole model, and of the largest single module's own full tensors (the transient peak of a
    sharded build, which gathers one module at a time)."""

    def full(p: Any) -> int:
        return getattr(p, "ds_numel", p.numel()) * p.element_size()

    unique = {id(p): p for p in model.parameters()}.values()
    local = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size() for p in unique)
    transient = max((sum(full(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return {"local_bytes": local, "full_bytes": sum(full(p) for p in unique), "transient_bytes": transient}


def micro_step(engine: Any, family: Any, batch: dict[str, Any], meter: LossMeter) -> None:
    """Forward, backward and (every grad_accum micro-steps, inside DeepSpeed) the optimizer step on
    one micro-batch; the loss joins ``meter`` on the device."""
    loss = family.loss(engine, _to(family.collate(batch), engine.device))
    engine.backward(loss)
    engine.step()
    meter.add(loss)


def _eval_batches(shard: Any, cfg: Config, family: Any) -> Iterator[Any]:
    it = shard.iter_batches(batch_size=cfg.train.micro_batch_size, drop_last=True, batch_format="numpy")
    for i, b in enumerate(it):
        if i >= cfg.train.eval_batches:
            break
        yield family.collate(b)


def _evaluate(engine: Any, batches: list[Any], family: Any) -> float:
    """Mean validation loss over every rank's first ``eval_batches`` micro-batches."""
    import torch
    import torch.distributed as dist

    # Every rank must run the same number of forwards: ZeRO-3 gathers parameters collectively.
    n = all_reduce(torch.tensor([len(batches)], device=engine.device), engine.device, dist.ReduceOp.MIN)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float32, device=engine.device)
    with torch.no_grad():
        for b in batches[: int(to_host(n)[0])]:
            total[0] += family.loss(engine, _to(b, engine.device)).detach().float()
            total[1] += 1
    engine.train()
    loss_sum, count = to_host(all_reduce(total, engine.device))
    if count == 0:
        raise RuntimeError(
            "data: the validation split has fewer rows than train.micro_batch_size "
            "x train.num_workers; raise data.val_fraction"
        )
    return loss_sum / count


def _probe(engine: Any, val_batches: list[Any], family: Any) -> dict[str, Any]:
    """Outputs of the live engine on a fixed input: export checks the artifact reproduces them."""
    import torch

    inputs = family.probe(val_batches[0])
    engine.eval()
    with torch.no_grad():
        logits = family.forward(engine, _to(inputs, engine.device)).float().cpu()
    engine.train()
    return {**inputs, "logits": logits.contiguous()}


def _restored_logit_diff(engine: Any, family: Any, local: str) -> float | None:
    """After a resize: the restored engine's logits on the probe the checkpoint saved against the
    logits saved with it; None when the checkpoint has no probe (one written before every
    checkpoint carried one)."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(local, ck.VERIFY_FILE)
    if not os.path.isfile(path):
        return None
    saved = load_file(path)
    logits = saved.pop("logits")
    engine.eval()
    with torch.no_grad():
        now = family.forward(engine, _to(saved, engine.device)).float().cpu()
    engine.train()
    return float((now - logits).abs().max())


def _save(
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
            _write_run_files(engine, cfg, state, metrics, world, verify, local, adapter_only=adapter_only)
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


def _save_async(
    saver: BackgroundSave,
    engine: Any,
    cfg: Config,
    state: dict,
    metrics: dict,
    world: int,
    verify: dict | None,
    progress: _Progress,
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
        _write_run_files(engine, cfg, state, metrics, world, verify, local, adapter_only=adapter_only)
    snapshot_s = time.monotonic() - t0

    def published(write_s: float, write_cpu_s: float) -> None:
        progress.send(
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


def _write_run_files(
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
