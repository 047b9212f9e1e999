"""A simulated cluster as ``modelfleet cluster up`` starts it (token auth, its own ports and
MODELFLEET_HOME), taken down by ``modelfleet cluster down`` with nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .cli import cli_env, mf
from .waiting import wait_port_free, wait_until


class SimCluster:
    """``up()`` waits for its ports to be free, then runs ``cluster up``; ``down()`` runs
    ``cluster down``, waits until no process of this cluster is left (SIGKILLs and fails after
    ``down_timeout_s`` otherwise) and until its ports are free again. ``down()`` is idempotent."""

    def __init__(
        self,
        home: Path,
        *,
        gcs_port: int,
        dashboard_port: int,
        serve_port: int,
        nodes: int,
        cpus_per_node: int,
        gpus_per_node: int,
        up_timeout_s: float = 480,
        head_gpus: int | None = None,
        isolated: bool = False,
        **env: str,
    ) -> None:
        self.home, self.nodes = home, nodes
        self.gcs_port, self.dashboard_port, self.serve_port = gcs_port, dashboard_port, serve_port
        self.cpus_per_node, self.gpus_per_node, self.up_timeout_s = cpus_per_node, gpus_per_node, up_timeout_s
        self.head_gpus, self.isolated = head_gpus, isolated
        # One cache-aware router per simulated node (when an app turns serve.router on), not the
        # default two: every node of the 2-core machine runs an HAProxy; router redundancy is tested
        # on the session's Ray (tests/integration/test_serving.py).
        self.env = cli_env(home, **{"RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE": "1", **env})
        self.is_up, self.up_output, self.up_s = False, "", 0.0
        self.spoiled = False  # a drill broke it (killed a node): the next user gets a fresh one

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def temp_dir(self) -> str:
        return f"/tmp/modelfleet-{self.gcs_port}"  # what `cluster up` names Ray's temp dir

    def up(self) -> SimCluster:
        for port in (self.gcs_port, self.dashboard_port, self.serve_port):
            wait_port_free(port, 120, "an earlier cluster or Serve instance")
        t0 = time.monotonic()
        try:
            r = mf(
                self.env,
                "cluster",
                "up",
                "--nodes",
                str(self.nodes),
                "--cpus-per-node",
                str(self.cpus_per_node),
                "--gpus-per-node",
                str(self.gpus_per_node),
                "--gcs-port",
                str(self.gcs_port),
                "--dashboard-port",
                str(self.dashboard_port),
                "--serve-port",
                str(self.serve_port),
                *(["--head-gpus", str(self.head_gpus)] if self.head_gpus is not None else []),
                *(["--isolated"] if self.isolated else []),
                timeout=self.up_timeout_s,
            )
        except BaseException:
            self.down()  # also after a failed or timed-out `up`: nothing of ours may outlive it
            raise
        self.is_up, self.spoiled = True, False
        self.up_output, self.up_s = r.stdout + r.stderr, time.monotonic() - t0
        return self

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster (their command lines name its temp dir)."""
        out = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def down(self, down_timeout_s: float = 60) -> None:
        self.is_up = False
        mf(self.env, "cluster", "down", check=False, timeout=300)
        try:
            wait_until(lambda: not self.leftover_pids(), down_timeout_s, "the cluster's processes to exit", 0.5)
        except TimeoutError:
            left = self.leftover_pids()
            for pid in left:  # a head that failed to start is not in the state file: stop what we began
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise AssertionError(f"cluster down left processes: {left}") from None
        for port in (self.serve_port, self.dashboard_port, self.gcs_port):
            wait_port_free(port, 60, "after cluster down")

    def state_api(self, path: str) -> list[dict]:
        """Ray's state API over HTTP, with the cluster's token (as ``ray list ...`` would send it)."""
        import httpx

        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        r = httpx.get(f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def train_worker_nodes(self) -> set[str]:
        """Node ids hosting a live Ray Train worker, from Ray's state API."""
        actors = self.state_api(
            "/api/v0/actors?limit=1000&filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker"
        )
        return {a["node_id"] for a in actors if a["state"] == "ALIVE"}
