"""Commands that no other test drives as a user types them: `pipeline` in process and `demo` as a
separate driver, both on the session's Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
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


def test_demo_command_trains_serves_scales_and_fits_on_one_screen(ray_session, tmp_path):
    """`make demo`'s command as a separate driver of the session's Ray (RAY_ADDRESS): trains,
    serves, scales 1 -> 2 -> 1 under its burst, and prints its story in at most 40 lines (Ray's
    process logs stay in Ray's log directory, which it names). Steps are cut 5x but keep the
    default's 3 evaluations and 3 checkpoints, so the screen has the default's lines. Its closing
    ray.shutdown() only disconnects that driver, and it stops the Serve instance it started."""
    from helpers import serve_gone, wait_until

    env = {
        **os.environ,
        "MODELFLEET_HOME": str(tmp_path / "home"),
        "DS_ACCELERATOR": "cpu",
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("MODELFLEET_VERBOSE", None)
    steps = {"train.max_steps": 12, "train.eval_every": 4, "train.checkpoint_every": 4}
    cmd = [str(Path(sys.executable).parent / "modelfleet"), "demo", "--set", f"storage.path={tmp_path / 'storage'}"]
    for k, v in steps.items():
        cmd += ["--set", f"{k}={v}"]
    wait_until(lambda: serve_gone(DEMO_PORT), 120, "an earlier Serve instance gone", 0.5)
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    screen = r.stdout + r.stderr
    assert r.returncode == 0, screen[-6000:]
    out = r.stdout
    assert "== validation loss by step: 4: " in out and "8: " in out and "12: " in out, out
    assert f"at http://127.0.0.1:{DEMO_PORT}/v1/completions" in out
    peak = int(out.split("peak replicas ")[1].split()[0])
    assert peak == 2 and "no scale-up seen" not in out, out  # the autoscale showcase happened
    assert "replicas back to 1" in out and "== Ray shut down" in out
    assert "Ray's process logs are in " in r.stderr, r.stderr[-3000:]
    # One screen: lines as a terminal shows them (tqdm redraws its bar in place with \r).
    lines = screen.count("\n")
    assert lines <= 40, f"the demo printed {lines} lines:\n{screen}"
    wait_until(lambda: serve_gone(DEMO_PORT), 120, "the demo's Serve shut down", 0.5)
