"""A simulated multi-node cluster on one machine: one ``ray start`` (its own raylet) per node.

Each node advertises logical GPUs, so placement (which worker lands where, PACK/SPREAD,
fractional GPUs, waiting for capacity) behaves as on a real cluster while the work computes on
CPU. ``up`` records every process it starts in a state file; ``down`` and ``kill-node`` act on
exactly those processes, never on another Ray instance of the same machine.

Ports are derived from the GCS port so two nodes never contend for one: each node gets its own
node-manager, object-manager, agent and worker-port range.

Over 400 lines: the spec and state file, starting nodes (ports, ``--isolated``'s mounts, the auth
token) and acting on them (status, kill, drain, restart, down). The node actions would split off
from the start-up; they stay because both read and write the one state file ``up`` records every
process and port in, and restart re-runs start-up's own node command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from modelfleet.cluster.haproxy import apply_haproxy_env
from modelfleet.config.coerce import build, check
from modelfleet.errors import ClusterError, ConfigError
from modelfleet.raycompat import available_resources_per_node, node_ip_address

# cluster/local.yaml in a checkout; these built-in values are the same when it is absent.
DEFAULTS: dict[str, Any] = {
    "nodes": 3,
    "cpus_per_node": 4,
    "gpus_per_node": 2,
    "dashboard_port": 8265,
    "serve_port": 8000,
    "gcs_port": 6380,
    "object_store_memory_mb": 512,
    "auth": "token",
    "head_gpus": None,
    "isolated": False,
}
_PROJECT_DEFAULTS = Path(__file__).resolve().parents[3] / "cluster" / "local.yaml"
# Marker resource: the trainer picks the gloo backend on clusters whose GPUs are simulated.
SIMULATED = "modelfleet_simulated_gpu_node"


@dataclass
class ClusterSpec:
    nodes: int = DEFAULTS["nodes"]
    cpus_per_node: int = DEFAULTS["cpus_per_node"]
    gpus_per_node: int = DEFAULTS["gpus_per_node"]
    dashboard_port: int = DEFAULTS["dashboard_port"]
    serve_port: int = DEFAULTS["serve_port"]
    gcs_port: int = DEFAULTS["gcs_port"]
    object_store_memory_mb: int = DEFAULTS["object_store_memory_mb"]
    auth: Literal["token", "disabled"] = DEFAULTS["auth"]
    head_gpus: int | None = DEFAULTS["head_gpus"]
    """GPUs of the head node; None: ``gpus_per_node`` like the others (a real cluster's head often
    has none: then GPU workers live on worker nodes only, and losing one loses its GPUs)."""

    isolated: bool = DEFAULTS["isolated"]
    """Each worker node in its own mount namespace with a private /tmp, so a file one node writes
    under /tmp is invisible to the others, as on separate machines (the head, where drivers and the
    CLI run, keeps the host's view). Needs ``unshare`` (util-linux) and root or user namespaces."""

    def gpus_of(self, i: int) -> int:
        return self.head_gpus if i == 0 and self.head_gpus is not None else self.gpus_per_node

    def __post_init__(self) -> None:
        # Types and unknown keys are checked where the spec is read (``load_spec``: the root
        # config's builder, config/coerce.py); the ranges here hold however it is built.
        for key in ("nodes", "cpus_per_node", "object_store_memory_mb"):
            check(getattr(self, key) >= 1, f"cluster.{key}", f"must be an integer >= 1, got {getattr(self, key)!r}")
        check(self.gpus_per_node >= 0, "cluster.gpus_per_node", f"must be an integer >= 0, got {self.gpus_per_node!r}")
        check(
            self.head_gpus is None or self.head_gpus >= 0,
            "cluster.head_gpus",
            f"must be an integer >= 0, got {self.head_gpus!r}",
        )
        for key in ("dashboard_port", "serve_port", "gcs_port"):
            port = getattr(self, key)
            check(1024 <= port <= 65000, f"cluster.{key}", f"must be a port in 1024..65000, got {port!r}")
        check(self.nodes <= 16, "cluster.nodes", f"at most 16 simulated nodes, got {self.nodes}")


def gpus_are_simulated() -> bool:
    """The connected Ray cluster's GPUs are logical ones on CPU nodes (``modelfleet cluster up``):
    training talks gloo and computes on CPU; replicas holding such a GPU decode on CPU."""
    import ray

    return ray.cluster_resources().get(SIMULATED, 0) > 0


def load_spec(path: str | None = None, **overrides: Any) -> ClusterSpec:
    """Defaults, then the YAML file (cluster/local.yaml by default), then non-None overrides."""
    values = dict(DEFAULTS)
    src = Path(path) if path else _PROJECT_DEFAULTS
    if path and not src.is_file():
        raise ConfigError(f"cluster config {path!r} does not exist")
    if src.is_file():
        loaded = yaml.safe_load(src.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"cluster config {src}: must hold a mapping, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return build(ClusterSpec, values, "cluster.")
    except ConfigError as e:
        raise ConfigError(f"{e} (cluster config {src})" if src.is_file() else str(e)) from None


@dataclass
class NodeState:
    name: str
    node_manager_port: int
    pids: list[int] = field(default_factory=list)
    node_id: str | None = None


@dataclass
class ClusterState:
    spec: ClusterSpec
    temp_dir: str
    nodes: list[NodeState]
    started_at: float
    node_ip: str = "127.0.0.1"

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.spec.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.dashboard_port}"

    def node(self, name: str) -> NodeState:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterError(f"no simulated node named {name!r}; nodes: {', '.join(n.name for n in self.nodes)}")


def state_dir() -> Path:
    return Path(os.environ.get("MODELFLEET_HOME", Path.home() / ".modelfleet")) / "cluster"


def _state_file() -> Path:
    return state_dir() / "state.json"


def read_state() -> ClusterState | None:
    f = _state_file()
    if not f.is_file():
        return None
    d = json.loads(f.read_text())
    return ClusterState(
        spec=build(ClusterSpec, d["spec"], "cluster."),
        temp_dir=d["temp_dir"],
        nodes=[NodeState(**n) for n in d["nodes"]],
        started_at=d["started_at"],
        node_ip=d.get("node_ip", "127.0.0.1"),
    )


def _write_state(st: ClusterState) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(st), indent=1))
    tmp.replace(_state_file())


def ray_env(spec: ClusterSpec | None = None) -> dict[str, str]:
    """Environment for anything that talks to the local cluster (ray CLI, drivers, job clients)."""
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = spec.auth if spec else env.get("RAY_AUTH_MODE", "token")
    # Job entrypoints say `python ...`: on the simulated cluster that must be this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def use_local_cluster_env() -> ClusterState | None:
    """If a simulated cluster is up, point this process's Ray client at it (address + auth mode)."""
    st = read_state()
    if st is not None and _alive(st.nodes[0]):
        os.environ.setdefault("RAY_ADDRESS", st.gcs_address)
        os.environ.setdefault("RAY_AUTH_MODE", st.spec.auth)
        if (Path(st.temp_dir) / "hap").is_dir():  # `up` ran it with HAProxy's ingress
            # A driver builds Serve apps against the cluster's ingress mode (serve/app.py).
            os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    return st


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _ours(temp_dir: str, *, daemons_only: bool = False, gcs: str | None = None) -> set[int]:
    """PIDs whose command line names our temp dir; ``daemons_only`` leaves out Ray's task and
    actor workers, which another node's raylet may have forked meanwhile."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            # (The raylet's own command line mentions default_worker.py inside a longer flag.)
            if daemons_only and (
                not cmd or cmd[0].startswith("ray::") or any(a.endswith("default_worker.py") for a in cmd)
            ):
                continue
            # Ray's client server names the GCS address but not the temp dir.
            if any(temp_dir in a for a in cmd) or (
                gcs and "ray.util.client.server" in cmd and f"--address={gcs}" in cmd
            ):
                pids.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _alive(node: NodeState) -> bool:
    import psutil

    return any(psutil.pid_exists(p) for p in node.pids)


def _node_args(spec: ClusterSpec, i: int, temp_dir: str) -> list[str]:
    base = spec.gcs_port
    lo = 20000 + i * 1000  # each node its own worker-port range: raylets do not coordinate ports
    resources = {SIMULATED: 1} if spec.gpus_per_node or spec.gpus_of(0) else {}
    return [
        f"--num-cpus={spec.cpus_per_node}",
        f"--num-gpus={spec.gpus_of(i)}",
        f"--resources={json.dumps(resources)}",
        f"--node-manager-port={base + 10 + i}",
        f"--object-manager-port={base + 30 + i}",
        f"--dashboard-agent-listen-port={base + 50 + i}",
        f"--dashboard-agent-grpc-port={base + 70 + i}",
        f"--runtime-env-agent-port={base + 90 + i}",
        f"--metrics-export-port={base + 110 + i}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 999}",
        f"--object-store-memory={spec.object_store_memory_mb * 2**20}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]


def _under_tmp_paths() -> list[str]:
    """The paths under /tmp that a node's ``ray start`` needs (the interpreter, the venv, the
    checkout, the working directory, the Python path): bound back into its private /tmp, so a
    checkout or venv under the system temp directory (CI clones there) still runs; every other
    /tmp path stays private. Outermost only: a venv inside the checkout comes with it."""
    here = Path(__file__).resolve()
    wanted = [sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent)]
    wanted += [str(here.parents[3]), str(here.parents[1]), os.getcwd()]
    wanted += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    found = sorted({str(Path(p).resolve()) for p in wanted if Path(p).resolve().is_relative_to("/tmp")})
    found = [p for p in found if p != "/tmp"]
    return [p for p in found if not any(p != q and Path(p).is_relative_to(q) for q in found)]


# Inside the new namespace: keep the host /tmp open on fd 3 (a bind source after it is covered),
# mount the private tmpfs, then bind each needed host path back at its own place.
_ISOLATE_SH = (
    "exec 3</tmp && mount -t tmpfs -o mode=1777 modelfleet-node /tmp && "
    'while [ "$1" != -- ]; do mkdir -p "$1" && mount --no-canonicalize --rbind "/proc/self/fd/3/${1#/tmp/}" "$1" && shift; done && '
    'shift && exec 3<&- && exec "$@"'
)


def _isolate(cmd: list[str], keep: list[str] | None = None) -> list[str]:
    """``cmd`` in a new mount namespace whose /tmp is an empty tmpfs: the node's processes (its
    raylet and every worker it starts) see only their own /tmp, plus ``keep`` (default: the paths
    under /tmp this environment runs from, see ``_under_tmp_paths``) bound back from the host.
    Not root: a user namespace too."""
    import shutil

    unshare = shutil.which("unshare")
    if unshare is None:
        raise ConfigError("cluster.isolated: needs the `unshare` command (util-linux) to give each node its own /tmp")
    keep = _under_tmp_paths() if keep is None else keep
    for p in keep:
        if not Path(p).is_absolute() or not Path(p).is_relative_to("/tmp") or p.rstrip("/") == "/tmp":
            raise ConfigError(f"cluster.isolated: a path to keep must be absolute and under /tmp, got {p!r}")
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [
        unshare,
        *userns,
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        _ISOLATE_SH,
        "sh",
        *keep,
        "--",
        *cmd,
    ]


def _node_cmd(st: ClusterState, i: int) -> list[str]:
    """``ray start`` of worker node ``i`` (isolated when the spec says so)."""
    cmd = [_ray_bin(), "start", f"--address={st.gcs_address}", *_node_args(st.spec, i, st.temp_dir)]
    return _isolate(cmd) if st.spec.isolated else cmd


def _start(cmd: list[str], spec: ClusterSpec, what: str, *, quiet: bool = False) -> None:
    r = subprocess.run(cmd, env=ray_env(spec), capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        # quiet: the command's output is a secret (the auth token); never echo it.
        tail = "" if quiet else "\n".join((r.stdout + r.stderr).strip().splitlines()[-8:])
        raise ClusterError(f"starting the {what} failed (exit {r.returncode}):\n{tail}")


def up(spec: ClusterSpec, *, log: Any = print) -> ClusterState:
    """Start a head and ``nodes - 1`` workers; start Serve's HTTP proxy; record every process."""
    os.environ["RAY_AUTH_MODE"] = spec.auth  # before Ray is imported: it reads the mode once
    old = read_state()
    if old is not None and any(_alive(n) for n in old.nodes):
        raise ClusterError(
            f"a simulated cluster is already up (GCS {old.gcs_address}); run `modelfleet cluster down` first"
        )
    _check_ports_free(spec)
    if spec.auth == "token":
        ensure_auth_token(spec)
    temp_dir = f"/tmp/modelfleet-{spec.gcs_port}"  # short: Ray's unix socket paths must fit 107 bytes
    apply_haproxy_env(f"{temp_dir}/hap")  # Serve's ingress mode: every `ray start` below inherits it
    # Ray advertises the machine's address, not loopback; HTTP endpoints stay on 127.0.0.1.
    st = ClusterState(spec=spec, temp_dir=temp_dir, nodes=[], started_at=time.time(), node_ip=node_ip_address())
    # A SIGTERM (a supervisor's timeout, `kill`) must unwind through the cleanup below too.
    main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main else None
    try:
        _start_nodes(st, spec, log)
        _resolve_node_ids(st)
        _write_state(st)
        _start_serve_proxy(st)
    except BaseException:
        down(st)  # a failed or interrupted `up` leaves nothing running (`_ours` finds every process)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return st


def _start_nodes(st: ClusterState, spec: ClusterSpec, log: Any) -> None:
    temp_dir = st.temp_dir
    ray = _ray_bin()
    for i in range(spec.nodes):
        name = "head" if i == 0 else f"worker-{i}"
        before = _ours(temp_dir, daemons_only=True, gcs=st.gcs_address)
        t0 = time.time()
        if i == 0:
            cmd = [
                ray,
                "start",
                "--head",
                f"--port={spec.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={spec.dashboard_port}",
                "--include-dashboard=true",
                "--ray-client-server-port",
                str(spec.gcs_port + 130),
                *_node_args(spec, i, temp_dir),
            ]
        else:
            cmd = _node_cmd(st, i)
        _start(cmd, spec, f"{name} node")
        node = NodeState(
            name=name,
            node_manager_port=spec.gcs_port + 10 + i,
            pids=sorted(_ours(temp_dir, daemons_only=True, gcs=st.gcs_address) - before),
        )
        st.nodes.append(node)
        _write_state(st)  # after every node: a failed `up` can still be taken `down`
        log(f"started {name} ({spec.cpus_per_node} CPU, {spec.gpus_of(i)} GPU) in {time.time() - t0:.1f} s")


def ensure_auth_token(spec: ClusterSpec) -> Path:
    """``ray start`` refuses token mode without a token; on a fresh machine make one
    (~/.ray/auth_token, kept if it exists) the way Ray's own CLI documents. The token grants the
    Jobs API, so it is never readable by other local users, not even for a moment: ~/.ray is made
    0700 first and Ray's CLI runs under umask 077 (it writes the file with the default mode)."""
    home = Path.home() / ".ray"
    home.mkdir(mode=0o700, exist_ok=True)
    if home.stat().st_uid == os.geteuid():
        home.chmod(0o700)
    token = home / "auth_token"
    existed = token.is_file()
    old = os.umask(0o077)
    try:
        _start([_ray_bin(), "get-auth-token", "--generate"], spec, "auth token generation", quiet=True)
    finally:
        os.umask(old)
    if existed:
        token.chmod(0o600)  # a token written before this version, with Ray's default mode
    return token


def _check_ports_free(spec: ClusterSpec) -> None:
    import socket

    for port, what in (
        (spec.gcs_port, "gcs_port"),
        (spec.dashboard_port, "dashboard_port"),
        (spec.serve_port, "serve_port"),
    ):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise ClusterError(
                    f"cluster.{what}: port {port} on 127.0.0.1 is already in use; "
                    f"choose another with --{what.replace('_', '-')}"
                )


def _driver(st: ClusterState) -> Any:
    import ray

    os.environ["RAY_AUTH_MODE"] = st.spec.auth
    if not ray.is_initialized():
        ray.init(address=st.gcs_address, log_to_driver=False, logging_level="ERROR")
    return ray


def _resolve_node_ids(st: ClusterState, timeout_s: float = 60) -> None:
    ray = _driver(st)
    deadline = time.time() + timeout_s
    while True:
        by_port = {n["NodeManagerPort"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for node in st.nodes:
            node.node_id = by_port.get(node.node_manager_port)
        if all(n.node_id for n in st.nodes):
            return
        if time.time() > deadline:
            missing = [n.name for n in st.nodes if not n.node_id]
            raise ClusterError(f"nodes {missing} did not register with the head within {timeout_s:g} s")
        time.sleep(0.5)


def _start_serve_proxy(st: ClusterState) -> None:
    from ray import serve

    _driver(st)
    # One proxy on the head: every node shares 127.0.0.1, so per-node proxies would collide.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": st.spec.serve_port})


def status(st: ClusterState) -> list[dict[str, Any]]:
    """One row per node: name, node id, alive, total and free resources."""
    os.environ["RAY_AUTH_MODE"] = st.spec.auth
    from ray.util.state import list_nodes

    nodes = {n.node_id: n for n in list_nodes(address=st.dashboard_url, limit=100, raise_on_missing_output=False)}
    _driver(st)
    free = available_resources_per_node()
    rows = []
    for node in st.nodes:
        info = nodes.get(node.node_id)
        total = dict(getattr(info, "resources_total", {}) or {})
        avail = free.get(node.node_id, {})
        rows.append(
            {
                "name": node.name,
                "node_id": node.node_id,
                "state": getattr(info, "state", "UNKNOWN"),
                "cpu": f"{avail.get('CPU', 0):g}/{total.get('CPU', 0):g}",
                "gpu": f"{avail.get('GPU', 0):g}/{total.get('GPU', 0):g}",
            }
        )
    return rows


def _kill_tree(pids: list[int], sig: int) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def kill_node(st: ClusterState, name: str) -> NodeState:
    """SIGKILL one worker node's raylet and everything under it (a failure drill)."""
    node = st.node(name)
    if node.name == "head":
        raise ClusterError("kill-node head would take the whole cluster down; use `modelfleet cluster down`")
    if not _alive(node):
        raise ClusterError(f"node {name!r} is not running")
    _kill_tree(node.pids, signal.SIGKILL)
    return node


def drain_node(st: ClusterState, name: str, deadline_s: int, *, kill: bool = True, on_drained: Any = None) -> NodeState:
    """A spot reclaim, simulated: ask Ray to drain one worker node for preemption with a deadline
    (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``: Ray Train's workers there get
    ``get_preemption_info()``), then, at the deadline, SIGKILL it (Ray leaves that to the caller,
    as a cloud provider would do it). ``kill=False`` only drains."""
    node = st.node(name)
    if node.name == "head":
        raise ClusterError("drain-node head: the head node cannot be drained")
    if not _alive(node) or not node.node_id:
        raise ClusterError(f"node {name!r} is not running")
    if deadline_s <= 0:
        raise ClusterError(f"drain-node: --deadline-s must be > 0, got {deadline_s}")
    os.environ["RAY_AUTH_MODE"] = st.spec.auth
    t_end = time.monotonic() + deadline_s
    cmd = [_ray_bin(), "drain-node", f"--address={st.gcs_address}", f"--node-id={node.node_id}"]
    cmd += ["--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=modelfleet cluster drain-node"]
    _start([*cmd, f"--deadline-remaining-seconds={deadline_s}"], st.spec, f"drain request for {name}")
    if on_drained is not None:  # told when Ray accepted the drain (the notice's time), before the kill
        on_drained(time.time())
    if kill:
        time.sleep(max(0.0, t_end - time.monotonic()))  # the reclaim comes at the deadline, not before
        _kill_tree(node.pids, signal.SIGKILL)
    return node


def restart_node(st: ClusterState, name: str) -> NodeState:
    """Start a killed worker node again: same name, ports and resources, a new Ray node id (the
    capacity an elastic training run grows back into)."""
    node = st.node(name)
    if node.name == "head":
        raise ClusterError("restart-node head: the head cannot be restarted alone; use `cluster down` and `up`")
    if _alive(node):
        raise ClusterError(f"node {name!r} is running; kill it first (`modelfleet cluster kill-node {name}`)")
    i = st.nodes.index(node)
    before = _ours(st.temp_dir, daemons_only=True, gcs=st.gcs_address)
    os.environ["RAY_AUTH_MODE"] = st.spec.auth
    apply_haproxy_env(f"{st.temp_dir}/hap")  # as `up` started it
    _start(_node_cmd(st, i), st.spec, f"{name} node")
    node.pids = sorted(_ours(st.temp_dir, daemons_only=True, gcs=st.gcs_address) - before)
    node.node_id = None
    _resolve_node_ids(st)
    _write_state(st)
    return node


def down(st: ClusterState) -> int:
    """Stop every process ``up`` started (workers first, then the head); returns how many."""
    import psutil

    if os.environ.get("RAY_ADDRESS") == st.gcs_address:
        os.environ.pop("RAY_ADDRESS")
    pids = [p for n in reversed(st.nodes) for p in n.pids if psutil.pid_exists(p)]
    # Processes Ray started later under our temp dir (workers, agents) belong to us too.
    extra = sorted(_ours(st.temp_dir, gcs=st.gcs_address) - set(pids))
    _kill_tree(pids + extra, signal.SIGTERM)
    left = [p for p in pids + extra if psutil.pid_exists(p)]
    _kill_tree(left, signal.SIGKILL)
    _state_file().unlink(missing_ok=True)
    return len(pids) + len(extra)
