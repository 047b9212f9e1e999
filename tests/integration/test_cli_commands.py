"""Commands that no other test drives as a user types them: `pipeline` in process and `demo` as a
separate driver, both on the session's Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

PIPELINE_PORT = 8126  # ours alone (see the other suites' ports)
DEMO_PORT = 8000  # DEMO_SERVE's port; no other suite serves there


def test_pipeline_command_trains_exports_and_serves(ray_session, tiny_data, tmp_path, capsys):
    from ray import serve

    from helpers import serve_gone, wait_until
    from modelfleet.cli import main

    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "data": {"path": tiny_data},
                "storage": {"path": str(tmp_path / "storage"), "run_name": "pipe", "model_name": "pipe"},
                "train": {"max_steps": 4, "eval_every": 4, "checkpoint_every": 0, "eval_batches": 1},
                "serve": {
                    "app_name": "pipe",
                    "route_prefix": "/pipe",
                    "port": PIPELINE_PORT,
                    "ingress": {"num_cpus": 0.05},
                    "models": [{"name": "pipe", "artifact": "pipe", "ray_actor_options": {"num_cpus": 0.5}}],
                },
            }
        )
    )
    wait_until(lambda: serve_gone(PIPELINE_PORT), 120, "an earlier Serve instance gone", 0.5)
    try:
        assert main(["pipeline", str(config)]) == 0
        out = capsys.readouterr().out
        assert "trained pipe; deploying pipe@v1" in out and "app pipe RUNNING" in out
        with httpx.Client(timeout=60) as c:
            models = c.get(f"http://127.0.0.1:{PIPELINE_PORT}/pipe/v1/models").json()["data"]
            assert [(m["id"], m["artifact"]) for m in models] == [("pipe", "pipe@v1")]
            r = c.post(
                f"http://127.0.0.1:{PIPELINE_PORT}/pipe/v1/completions",
                json={"prompt": "def ", "max_tokens": 4, "temperature": 0},
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        serve.shutdown()
        wait_until(lambda: serve_gone(PIPELINE_PORT), 120, "Serve shut down", 0.5)


@pytest.mark.slow  # the whole demo: train, serve, a burst until scale-up, scale-down
def test_demo_command_trains_serves_and_reports_what_it_saw(ray_session, tmp_path):
    """`modelfleet demo` as a separate driver of the session's Ray (RAY_ADDRESS): its closing
    ray.shutdown() only disconnects that driver, and it stops the Serve instance it started."""
    from helpers import serve_gone, wait_until

    env = {
        **os.environ,
        "MODELFLEET_HOME": str(tmp_path / "home"),
        "DS_ACCELERATOR": "cpu",
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = [
        str(Path(sys.executable).parent / "modelfleet"),
        "demo",
        "--set",
        f"storage.path={tmp_path / 'storage'}",
        "--set",
        "train.max_steps=10",
        "--set",
        "train.eval_every=5",
        "--set",
        "train.checkpoint_every=0",
    ]
    wait_until(lambda: serve_gone(DEMO_PORT), 120, "an earlier Serve instance gone", 0.5)
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "== validation loss by step: 5: " in out
    assert f"at http://127.0.0.1:{DEMO_PORT}/v1/completions" in out
    peak = int(out.split("peak replicas ")[1].split()[0])
    # The demo promises a scale-up: it either shows one or says plainly that it saw none.
    assert peak == 2 or "no scale-up seen" in out, out
    assert "replicas back to 1" in out and "== Ray shut down" in out
    wait_until(lambda: serve_gone(DEMO_PORT), 120, "the demo's Serve shut down", 0.5)
