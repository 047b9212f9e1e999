"""What is checked before a run's workers start: the config, data and run name against storage
(``preflight``, no cluster needed), then the worker group against the cluster (``check_capacity``)
and the memory plan against the workers' GPUs (``check_gpu_memory``). Bad input fails here in
seconds with one sentence, and nothing already written is touched."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pyarrow.fs as pafs

from modelfleet.cluster.local import gpus_are_simulated
from modelfleet.config import Config
from modelfleet.data.prepare import read_meta
from modelfleet.errors import ConfigError, StorageError
from modelfleet.families import get_family
from modelfleet.raycompat import serve_details
from modelfleet.storage import StorageLayout, check_writable, describe_error
from modelfleet.train import checkpoint as ck
from modelfleet.train.memory import ACCELERATOR_GIB, check_fits


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
