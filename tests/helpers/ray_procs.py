"""Ray's processes found through the OS (drills work without the dashboard's state API)."""

from __future__ import annotations

from .waiting import wait_until


def ray_process_pids(title: str, ancestor: int | None = None) -> list[int]:
    """PIDs of live processes whose title starts with ``title`` (Ray titles its workers
    ``ray::<Actor>...``), sorted. ``ancestor``: only descendants of that process (a local
    ``ray.init`` makes Ray's workers this test process's descendants), so a drill never touches
    another session's Ray."""
    import psutil

    procs = psutil.Process(ancestor).children(recursive=True) if ancestor else psutil.process_iter()
    pids = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and " ".join(p.cmdline()).startswith(title):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(pids)


def train_worker_pids(ancestor: int | None = None) -> list[int]:
    """PIDs of live Ray Train worker processes (``ray::RayTrainWorker...``), sorted."""
    return ray_process_pids("ray::RayTrainWorker", ancestor)


def serve_replica_pids(app: str, deployment: str, ancestor: int | None = None) -> list[int]:
    """PIDs of the live replicas of one Serve deployment (``ray::ServeReplica:APP:DEPLOYMENT``)."""
    return ray_process_pids(f"ray::ServeReplica:{app}:{deployment}", ancestor)


def engine_core_pids(replica_pid: int) -> list[int]:
    """PIDs of the engine core processes an LM replica started (its children running
    ``modelfleet.serve.engine_core``)."""
    import psutil

    try:
        children = psutil.Process(replica_pid).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for c in children:
        try:
            if "modelfleet.serve.engine_core" in c.cmdline():
                out.append(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_no_train_workers(ancestor: int, timeout_s: float = 120) -> None:
    """Wait until no Ray Train worker descends from ``ancestor``: a drill that killed or restarted
    workers leaves the shared Ray as the next test expects it."""
    wait_until(lambda: not train_worker_pids(ancestor), timeout_s, "the training workers to exit", 0.5)
