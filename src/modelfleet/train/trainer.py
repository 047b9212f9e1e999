"""The driver side of training: pre-flight checks, the TorchTrainer, live progress, export.

``train(cfg)`` is what ``modelfleet train`` and ``jobs/train.py`` call. Everything that can be
checked before workers start (data, run name, cluster capacity) is checked first, so bad input
fails in seconds with one sentence and nothing already written is touched.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from modelfleet.cluster import connect
from modelfleet.cluster.local import gpus_are_simulated
from modelfleet.cluster.visibility import check_visible_everywhere
from modelfleet.config import Config
from modelfleet.data.prepare import read_meta
from modelfleet.data.raydata import configure_context
from modelfleet.errors import ConfigError, StorageError, TrainingFailedError, TrainingStoppedError
from modelfleet.families import get_family
from modelfleet.raycompat import serve_details
from modelfleet.storage import (
    StorageLayout,
    check_writable,
    describe_error,
    dump_json,
    exists,
    is_remote,
    read_json,
    read_text,
    write_text,
)
from modelfleet.train import checkpoint as ck
from modelfleet.train.channel import start_channel
from modelfleet.train.export import export_checkpoint
from modelfleet.train.loop import train_loop_per_worker
from modelfleet.train.memory import ACCELERATOR_GIB, check_fits
from modelfleet.train.stopping import StopRequest
from modelfleet.train.throughput import TrainingGauges
from modelfleet.train.tracking import Tracker, TrackingSummary


@dataclass
class TrainResult:
    run_name: str
    run_dir: str
    checkpoint_step: int | None
    metrics: dict[str, Any]
    artifact: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    tracking: TrackingSummary | None = None


def preflight(cfg: Config, *, resume: str | None = None) -> dict[str, Any]:
    """Checks that need no cluster. Returns the prepared dataset's meta; sets the run name."""

    if not cfg.data.path:
        raise ConfigError("data.path: is empty; set it to a directory written by `modelfleet prepare`")
    # Object stores: a missing bucket, refused credentials or an unreachable endpoint fail here,
    # naming the URI and the cause, not in every worker after the cluster has started them.
    try:
        check_writable(cfg.storage.path)
    except StorageError as e:
        raise StorageError(f"storage.path: {e}") from None
    try:
        meta = read_meta(cfg.data.path)
    except OSError as e:
        raise ConfigError(f"data.path: {cfg.data.path} cannot be read: {describe_error(str(e))}") from None
    # The family checks the dataset fits the model and fills sizes the data decides.
    get_family(cfg.model.family).preflight(cfg, meta)
    per_step = cfg.train.micro_batch_size * cfg.train.max_workers
    for split in ("train", "val"):
        if meta[f"{split}_rows"] < per_step:
            raise ConfigError(
                f"data.path: the {split} split of {cfg.data.path} has {meta[f'{split}_rows']} sequences, "
                f"fewer than train.micro_batch_size x train.num_workers = {per_step}; add data or "
                f"lower the batch"
            )
    root = StorageLayout(cfg.storage.path).runs()
    fs, base = pafs.FileSystem.from_uri(root)
    if resume:
        cfg.storage.run_name = resume
        if fs.get_file_info(f"{base}/{resume}").type != pafs.FileType.Directory:
            raise ConfigError(f"--resume: run {resume!r} does not exist under {root}")
        found, skipped = ck.latest_complete(root, resume)
        if found is None and skipped:
            raise ck.CheckpointError(
                f"--resume: run {resume!r} has no complete checkpoint to resume from ({'; '.join(skipped)})"
            )
    else:
        if not cfg.storage.run_name:
            cfg.storage.run_name = f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000}"
        if fs.get_file_info(f"{base}/{cfg.storage.run_name}").type != pafs.FileType.NotFound:
            raise ConfigError(
                f"storage.run_name: run {cfg.storage.run_name!r} already exists under {root}; "
                f"resume it with --resume {cfg.storage.run_name} or pick another name"
            )
    return meta


def check_capacity(cfg: Config) -> None:
    """Refuse a worker group the cluster can never hold (Ray would wait for it forever)."""
    import ray

    t = cfg.train
    # An elastic run needs its minimum: it starts with what there is between min and max.
    need, what = t.min_workers, f"{t.min_workers}{' (the minimum of ' + str(t.num_workers) + ')' if t.elastic else ''}"
    need_cpu = need * t.cpus_per_worker
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"train.num_workers: {what} workers x {t.cpus_per_worker:g} CPU need "
            f"{need_cpu:g} CPUs but the cluster has {total.get('CPU', 0):g}"
        )
    if not any(n.get("CPU", 0) >= t.cpus_per_worker for n in nodes):
        raise ConfigError(f"train.cpus_per_worker: no node has {t.cpus_per_worker:g} CPUs")
    if t.use_gpu and total.get("GPU", 0) < need:
        raise ConfigError(f"train.use_gpu: {what} workers need {need} GPUs but the cluster has {total.get('GPU', 0):g}")
    if t.use_gpu:
        reserved, holders = serving_reservation()
        if total.get("GPU", 0) - reserved < need:
            raise ConfigError(
                f"train.num_workers: {what} GPU workers do not fit beside serving: the cluster has "
                f"{total.get('GPU', 0):g} GPUs and {reserved:g} are reserved for the minimum replicas of "
                f"{', '.join(holders)}; train with at most {int(total.get('GPU', 0) - reserved)} workers or "
                "lower serving's min_replicas"
            )


def worker_gpu_gib(cfg: Config) -> float | None:
    """Memory of one worker GPU: ``train.gpu_memory_gib``, else the cluster's accelerator type."""
    import ray

    if cfg.train.gpu_memory_gib:
        return cfg.train.gpu_memory_gib
    types = {k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:")}
    known = [ACCELERATOR_GIB[t] for t in types if t in ACCELERATOR_GIB]
    return min(known) if known else None


def check_gpu_memory(cfg: Config) -> None:
    """Refuse, before any GPU worker starts, a config whose memory plan does not fit the workers'
    GPUs (the driver may not see them). A set ``train.gpu_memory_gib`` is checked always (the
    user said what the GPUs hold; ``train`` checks it before connecting); otherwise simulated
    logical GPUs compute on CPU and are not checked."""
    if not cfg.train.use_gpu:
        return
    if cfg.train.gpu_memory_gib:
        check_fits(cfg, cfg.train.gpu_memory_gib)
        return
    if gpus_are_simulated():
        return
    gib = worker_gpu_gib(cfg)
    if gib is None:
        print(
            "train: the workers' GPU memory is unknown (no known accelerator type); set "
            "train.gpu_memory_gib to check the memory plan before launch",
            file=sys.stderr,
        )
        return
    check_fits(cfg, gib)


def serving_reservation() -> tuple[float, list[str]]:
    """GPUs that running Serve deployments keep for their minimum replicas (training gets the rest)."""
    try:
        # Serve's own instance details (what `serve status -v` and the dashboard read).
        details = serve_details() or {}
    except Exception:  # noqa: BLE001 - no Serve on this cluster: nothing reserved
        return 0.0, []
    reserved, holders = 0.0, []
    for app_name, app in (details.get("applications") or {}).items():
        for dep_name, dep in (app.get("deployments") or {}).items():
            dc = dep.get("deployment_config") or {}
            gpus = float((dc.get("ray_actor_options") or {}).get("num_gpus") or 0)
            auto = dc.get("autoscaling_config") or {}
            min_replicas = int(auto.get("min_replicas", 0) if auto else dc.get("num_replicas") or 0)
            if gpus and min_replicas:
                reserved += gpus * min_replicas
                holders.append(f"{app_name}/{dep_name} ({min_replicas} x {gpus:g} GPU)")
    return reserved, holders


def _local_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return f.readlines()


class _ProgressSink:
    """Driver side of the run's channel (train/channel.py): a live progress line and
    ``metrics.jsonl`` in the run dir.

    A local file is appended to, a line per record. An object has no append: the driver keeps
    the run's lines (those of earlier attempts read back first) and PUTs the whole object again
    at most every ``ROLL_S`` seconds and when the run ends (a PUT is atomic: readers see the old or
    the new object). A driver that dies loses at most the last ``ROLL_S`` seconds of records."""

    ROLL_S = 5.0

    def __init__(self, channel: Any, cfg: Config, run_dir: str, show: bool) -> None:
        self.channel, self.cfg, self.show = channel, cfg, show
        self.records: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.t0 = time.time()
        self.local = None if is_remote(run_dir) else run_dir
        self.remote = f"{run_dir}/metrics.jsonl" if is_remote(run_dir) else None
        self._lines = read_text(self.remote).splitlines(keepends=True) if self.remote and exists(self.remote) else []
        self._rolled = len(self._lines)
        # Worker-group size across attempts (and earlier runs of a resumed one): a change is a resize.
        earlier = self._lines if self.remote else _local_lines(os.path.join(run_dir, "metrics.jsonl"))
        built = [json.loads(x) for x in earlier if '"kind": "built"' in x]
        steps = [json.loads(x) for x in earlier if '"kind": "step"' in x]
        self._world = built[-1]["world"] if built else None
        self._last_step = steps[-1] if steps else None
        self._resized: dict[str, Any] | None = None
        self._resized_last: dict[str, Any] | None = None
        self._rolled_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bar = None
        self._last_step_line = ""  # the latest step's figures (the bar's postfix, or the eval lines')
        self.gauges = TrainingGauges.for_run(cfg.storage.run_name)  # Prometheus: see train/throughput.py
        self.tracker = Tracker.start(cfg, run_dir)  # TensorBoard + MLflow, off the sink's thread: train/tracking.py

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        self._roll(force=True)
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)
            self._roll()

    def _roll(self, force: bool = False) -> None:
        if not self.remote or len(self._lines) == self._rolled:
            return
        if force or time.time() - self._rolled_at >= self.ROLL_S:
            n = len(self._lines)
            write_text(self.remote, "".join(self._lines[:n]))
            self._rolled, self._rolled_at = n, time.time()

    def _drain(self, timeout: float = 0.0) -> None:
        import ray

        try:
            items = ray.get(self.channel.take.remote(timeout))
        except Exception:  # the channel actor is gone (cluster shutting down)
            return
        for item in items:
            self._handle(item)

    def _handle(self, item: dict[str, Any]) -> None:
        self._track_resize(item)
        self._write(item)

    def _track_resize(self, item: dict[str, Any]) -> None:
        """A worker group of another size than the previous one is a ``resize`` record, written
        at the new group's first step past the old group's last (step P): ``lost_s`` is the
        training time the resize cost, that step's start minus step P's end, so steps redone
        from the checkpoint count. Its parts: ``detection_s`` (P's end to the new workers'
        start: failure detection, teardown, scheduling), ``group_start_s`` (worker start to the
        built engine), ``restore_s`` (checkpoint download and load), ``first_step_s`` (to the
        first step's end, the data pipeline's start included) and ``redone_s`` over
        ``redone_steps`` (steps P had already trained). ``took_s``: P's end to the first step."""
        kind = item["kind"]
        pending = self._resized
        if kind == "built":
            if self._world is not None and item["world"] != self._world:
                self._resized = {"from_workers": self._world, "to_workers": item["world"], "built": item["time"]}
                self._resized_last = self._last_step
            self._world = item["world"]
        elif pending is not None and kind == "resume":
            pending.update(step=item["step"], resumed=item["time"])
        elif kind == "step":
            if pending is not None:
                if "first" not in pending:  # its elapsed_s runs from the new worker's start
                    pending.update(first=item, started=item["time"] - item["elapsed_s"])
                last = self._resized_last
                if last is None or item["step"] > last["step"]:
                    self._write(_resize_record(pending, last, item))
                    self._resized = None
            if self._resized is None:
                self._last_step = item

    def _write(self, item: dict[str, Any]) -> None:
        self.records.append(item)
        if self.local:
            os.makedirs(self.local, exist_ok=True)
            with open(os.path.join(self.local, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(item) + "\n")
        elif self.remote:
            self._lines.append(json.dumps(item) + "\n")
        self.tracker.record(item)
        kind = item["kind"]
        if kind == "step":
            self.gauges.record(item)
        if kind == "first_step":
            self.timings["time_to_first_step_s"] = item["time"] - self.t0
            self.timings["worker_init_s"] = item["init_s"]
        if not self.show:
            return
        if kind == "step":
            rate = (
                f"{item['tokens_per_s']:,.0f} tok/s"
                if item.get("tokens_per_s") is not None
                else f"{item['samples_per_s']:,.0f} samples/s"
            )
            mfu = f" | MFU {item['mfu']:.1%}" if item.get("mfu") is not None else ""
            self._last_step_line = f"loss {item['loss']:.3f} | {rate}{mfu} | lr {item['lr']:.2e}"
            if not sys.stderr.isatty():
                # A log file or a pipe (a Ray job's log, a test): no bar, whose redraws become
                # lines there; the evaluation lines carry the training figures instead.
                return
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=item["max_steps"],
                    initial=item["step"] - 1,
                    unit="step",
                    file=sys.stderr,
                    dynamic_ncols=True,
                    mininterval=0.5,
                )
            self._bar.set_postfix_str(self._last_step_line, refresh=False)
            self._bar.update(item["step"] - self._bar.n)
        else:
            msg = {
                "eval": lambda: (
                    f"step {item['step']}: val_loss {item['val_loss']:.4f} ppl {item['val_ppl']:.2f}"
                    + (f" | {self._last_step_line}" if self._bar is None and self._last_step_line else "")
                ),
                "checkpoint": lambda: f"step {item['step']}: checkpoint saved",
                "resume": lambda: (
                    f"resumed from the checkpoint at step {item['step']}"
                    + (f" (skipped: {'; '.join(item['skipped'])})" if item["skipped"] else "")
                ),
                "resize": lambda: (
                    f"step {item['step']}: {item['from_workers']} -> {item['to_workers']} workers "
                    f"({item.get('lost_s', item['took_s'])} s of training lost, "
                    f"{item.get('redone_steps', 0)} steps redone)"
                ),
                "reshard": lambda: (
                    f"step {item['step']}: checkpoint of {item['from_workers']} ranks re-partitioned "
                    f"for {item['to_workers']} in {item['restore_s']:.1f} s (grad_accum {item['grad_accum']})"
                ),
            }.get(kind)
            if msg:
                (self._bar.write if self._bar is not None else print)(msg())


def _resize_record(r: dict[str, Any], last: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """The ``resize`` record (see ``_ProgressSink._track_resize``) at step ``now``, the first past
    the old group's ``last``."""
    rec: dict[str, Any] = {
        "kind": "resize",
        "time": now["time"],
        "step": r.get("step", 0),
        "from_workers": r["from_workers"],
        "to_workers": r["to_workers"],
        "took_s": None if last is None else round(r["first"]["time"] - last["time"], 1),
    }
    if last is None:
        return rec
    first = r["first"]
    started = r.get("started", r["built"])
    resumed = r.get("resumed", r["built"])
    redone = last["step"] - rec["step"]
    begin_now = now["time"] - now["step_time_s"]  # when step P+1 itself began
    parts = {
        "detection_s": started - last["time"],
        "group_start_s": r["built"] - started,
        "restore_s": resumed - r["built"],
        "first_step_s": (first["time"] if redone else begin_now) - resumed,
        "redone_s": begin_now - first["time"] if redone else 0.0,
    }
    return {
        **rec,
        "lost_s": round(begin_now - last["time"], 2),
        **{k: round(v, 2) for k, v in parts.items()},
        "redone_steps": redone,
    }


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
    sink = _ProgressSink(channel, cfg, run_dir, show_progress)
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
