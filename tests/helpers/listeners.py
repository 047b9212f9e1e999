"""Who listens beyond loopback on a simulated cluster (issue 28 item 8's drill): every LISTEN
socket of the cluster's processes (its daemons and all their descendants: Ray's workers, HAProxy,
the engine cores), each non-loopback one either Ray's own, by role and port range, or a finding.

Our app listeners (HAProxy's frontend, a replica's direct-ingress HTTP and gRPC ports, the router
replicas' ports, the engine core, which has none) must be on loopback. What Ray 2.60 cannot bind to
loopback on a multi-node cluster stays behind its token auth and is listed here by role; a listener
matching none of these fails the drill, naming its process and port."""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
SERVE_DIRECT_HTTP = range(30000, 31001)  # Ray's RAY_SERVE_DIRECT_INGRESS_{MIN,MAX}_HTTP_PORT
INTER_DEPLOYMENT = "Serve replica's inter-deployment gRPC (token auth)"


@dataclass(frozen=True)
class Listener:
    ip: str
    port: int
    pid: int
    process: str
    """The process's command line (a Ray worker's process title names its actor)."""

    def __str__(self) -> str:
        return f"{self.process[:90]!r} (pid {self.pid}) on {self.ip}:{self.port}"


def cluster_listeners(root_pids: list[int]) -> list[Listener]:
    """LISTEN sockets of ``root_pids`` and every descendant."""
    import psutil

    pids: set[int] = set()
    for pid in root_pids:
        try:
            p = psutil.Process(pid)
            pids.add(pid)
            pids.update(c.pid for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    out = []
    for k in psutil.net_connections("tcp"):
        if k.status != psutil.CONN_LISTEN or k.pid not in pids:
            continue
        try:
            cmd = " ".join(psutil.Process(k.pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        out.append(Listener(k.laddr.ip, k.laddr.port, k.pid, cmd))
    return out


def ray_role(listener: Listener, gcs_port: int, nodes: int) -> str | None:
    """Which of Ray's own listeners this non-loopback one is (ports as `cluster up` assigns them,
    cluster/local.py ``_node_args``), or None: a finding."""
    cmd, port, base = listener.process, listener.port, gcs_port
    workers = range(20000, 20000 + 1000 * nodes)  # each node's --min/--max-worker-port
    if "gcs_server" in cmd and port == base:
        return "GCS"
    if "/raylet " in cmd and port in (*range(base + 10, base + 10 + nodes), *range(base + 30, base + 30 + nodes)):
        return "raylet (node manager, object manager)"
    if cmd.startswith("ray::DashboardAgent") and any(
        port in range(base + off, base + off + nodes) for off in (50, 70, 110)
    ):
        return "dashboard agent (HTTP, gRPC, metrics export)"
    if cmd.startswith("ray::RuntimeEnvAgent") and port in range(base + 90, base + 90 + nodes):
        return "runtime-env agent"
    if "ray.util.client.server" in cmd and port == base + 130:
        return "Ray client server"
    if "ray/dashboard/dashboard.py" in cmd or "autoscaler/_private/monitor.py" in cmd:
        return "dashboard head / autoscaler monitor (their own gRPC and metrics servers)"
    if port in workers:
        return "core worker RPC (Ray's workers and the jobs' drivers)"
    if cmd.startswith("ray::ServeReplica") and port not in SERVE_DIRECT_HTTP:
        # Serve starts every replica's inter-deployment gRPC server on [::]:0 (any free port, so
        # it may fall in the direct-ingress gRPC range too), with Ray's token interceptor
        # (ray/serve/_private/replica.py, create_grpc_server_with_interceptors). One per replica:
        # ``extra_replica_listeners`` finds a second (a direct-ingress gRPC server beyond loopback).
        return INTER_DEPLOYMENT
    if cmd.startswith("ray::RayTrainWorker"):
        # torch.distributed's rendezvous store and gloo pairs: they must reach the other nodes,
        # and carry no auth of Ray's or ours (as on any Ray Train cluster: a network policy's job).
        return "Ray Train worker's torch.distributed (TCPStore, gloo)"
    return None


def extra_replica_listeners(found: list[Listener], gcs_port: int, nodes: int) -> list[str]:
    """Replicas with more than one inter-deployment-looking listener beyond loopback."""
    per_pid: dict[int, list[Listener]] = {}
    for x in found:
        if x.ip not in LOOPBACK and ray_role(x, gcs_port, nodes) == INTER_DEPLOYMENT:
            per_pid.setdefault(x.pid, []).append(x)
    return [", ".join(map(str, xs)) for xs in per_pid.values() if len(xs) > 1]
