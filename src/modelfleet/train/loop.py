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
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import ray.train

from modelfleet.config import Config
from modelfleet.families import build_model, get_family
from modelfleet.raycompat import train_storage
from modelfleet.storage import StorageLayout
from modelfleet.train import checkpoint as ck
from modelfleet.train import pickles
from modelfleet.train import progress as pr
from modelfleet.train.async_save import BackgroundSave
from modelfleet.train.channel import ProgressSender
from modelfleet.train.collectives import LossMeter, all_reduce, to_host
from modelfleet.train.deepspeed import build_ds_config, lr_lambda, skip_cpu_inference_comm_op, skip_muon_import
from modelfleet.train.engine_ops import (
    eval_batches,
    grad_norm,
    micro_step,
    param_storage,
    probe,
    restored_logit_diff,
    validation_loss,
)
from modelfleet.train.saves import save_async, save_sync
from modelfleet.train.stopping import StopWatch, halt_requested
from modelfleet.train.throughput import Peak, device_peak, lm_dims, model_flops_per_token, step_rates

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
    progress: ProgressSender
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
    return _Worker(cfg, rank, world, on_gpu, family, channel, ProgressSender(channel, rank), t_start)


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
                max_abs_logit_diff=restored_logit_diff(e.engine, w.family, local),
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
            halt = None if final else halt_requested(self.watch, self.meter)
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
            val_loss = validation_loss(engine, self._val_batches(), self.w.family)
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
            grad_norm=grad_norm(self.e.engine),
            **msgspec.structs.asdict(rates),
            elapsed_s=now - self.w.t_start,
            epoch=self.state["epoch"],
        )

    def _val_batches(self) -> list[Any]:
        if self.val_batches is None:
            self.val_batches = list(eval_batches(self.val_shard, self.w.cfg, self.w.family))
        return self.val_batches

    def _save(self, metrics: dict[str, Any]) -> None:
        w, e = self.w, self.e
        # Every checkpoint carries the probe (one forward on a fixed batch): a resize that
        # restores any of them checks the restored logits, and any of them can be exported.
        verify = probe(e.engine, self._val_batches(), w.family)
        t_save = time.monotonic()
        if e.saver is None:
            save_sync(e.engine, w.cfg, self.state, metrics, w.rank, w.world, verify, adapter_only=e.adapter_only)
            w.progress.send(pr.Checkpoint(step=self.step, mode="sync"))
        else:  # its "checkpoint" record is sent by rank 0 once it is published
            save_async(
                e.saver,
                e.engine,
                w.cfg,
                self.state,
                metrics,
                w.world,
                verify,
                w.progress.send,
                adapter_only=e.adapter_only,
            )
        # How long the step loop stopped for this save (the figure async saves cut).
        w.progress.send(pr.Save(step=self.step, mode=w.cfg.train.checkpoint_mode, stall_s=time.monotonic() - t_save))
