"""A real MLflow tracking server on 127.0.0.1 for the tracking tests: ``mlflow server`` in its own
process with a SQLite backend store, started on a free port, waited on by condition (its
``/health`` endpoint answers ``OK``) and stopped by ``stop()`` (the fixture's finalizer)."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

from .cli import BIN
from .s3 import _free_port
from .waiting import port_free, wait_until


class MlflowServer:
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> MlflowServer:
        log = open(self.work_dir / "mlflow-server.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.work_dir / 'server.db'}",
                "--artifacts-destination",
                str(self.work_dir / "artifacts"),
            ],
            cwd=self.work_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers go with it in stop()
        )
        wait_until(lambda: self.proc.poll() is not None or self._healthy(), timeout_s, "mlflow server /health", 0.25)
        assert self.proc.poll() is None, (self.work_dir / "mlflow-server.log").read_text()[-3000:]
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200 and r.read().strip() == b"OK"
        except OSError:
            return False

    def stop(self) -> None:
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        wait_until(lambda: port_free(self.port), 30, f"mlflow server's port {self.port} free")
