"""Serving helpers: a registry of random tiny models, Serve on a port for one module, an app
deployed on it, its replicas, and a bounded load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .waiting import port_free, wait_until


def publish_tiny_models(storage: Path, seeds: tuple[int, ...] = (1, 2), probe: str = "def main(") -> dict[str, str]:
    """Publish one randomly initialised tiny GPT per seed as tiny@v1, v2, ... (no training run)
    and return each version's greedy 8-token answer to ``probe`` (what a server must reproduce)."""
    import torch

    from modelfleet import registry
    from modelfleet.data.tokenizer import ByteTokenizer
    from modelfleet.families import build_model
    from modelfleet.models.gpt import generate
    from modelfleet.presets import load_config
    from modelfleet.train.export import write_artifact_dir

    cfg = load_config(preset="tiny", overrides=[f"storage.path={storage}"])
    tok, answers = ByteTokenizer(), {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(cfg.model).eval()
        ref = registry.publish(str(storage), "tiny", write_artifact_dir(model, cfg, {}), consume=True)
        ids = torch.tensor([tok.encode(probe)])
        answers[ref.version] = tok.decode(generate(model, ids, 8, temperature=0)[0, ids.size(1) :])
    return answers


def serve_gone(port: int) -> bool:
    """No Serve controller on the driver's Ray (an earlier ``serve.shutdown()`` has finished: it
    gives up waiting after 30 s) and nothing listening on ``port`` (the proxy has let go of it)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if ray.is_initialized():
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            return False
        except ValueError:
            pass
    return port_free(port)


@contextmanager
def serve_on(port: int, timeout_s: float = 120) -> Iterator:
    """Serve's HTTP proxy on 127.0.0.1:``port`` on the driver's (the session's) Ray, for one module
    fixture: first waits for any earlier Serve instance to be gone and the port free (the previous
    module's, or another cluster's on the same port), and after ``serve.shutdown()`` waits until it
    is gone again, so the next module starts clean. Yields ``ray.serve``."""
    from ray import serve

    wait_until(lambda: serve_gone(port), timeout_s, f"an earlier Serve instance gone and port {port} free", 0.5)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield serve
    finally:
        serve.shutdown()
        wait_until(lambda: serve_gone(port), timeout_s, f"Serve shut down and port {port} free", 0.5)


def deploy_app(storage: Path, port: int, app: str, models: list[dict], **serve_cfg) -> str:
    """``modelfleet.serve.app.deploy`` of one app under ``/<app>`` on ``port`` (returns once it is
    RUNNING); returns its URL."""
    from modelfleet.serve.operations import deploy

    deploy(
        {
            "app_name": app,
            "route_prefix": f"/{app}",
            "port": port,
            "storage_path": str(storage),
            "ingress": {"num_cpus": 0.05},
            "models": models,
            **serve_cfg,
        }
    )
    return f"http://127.0.0.1:{port}/{app}"


def running_replicas(app: str, deployment: str = "model-tiny") -> dict[str, int]:
    """Replica counts by state (RUNNING, STARTING, STOPPING...) of one deployment, from Serve."""
    from modelfleet.serve.operations import status

    return next((r["replicas"] for r in status() if r["app"] == app and r["deployment"] == deployment), {})


@dataclass
class LoadResult:
    """What a bounded load saw: requests sent, answered, failed (with why), and how long it took."""

    sent: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    texts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0


def run_load(client, n: int, concurrency: int, *, deadline_s: float, stop=None, **body) -> LoadResult:
    """Send up to ``n`` completions through ``client`` (a ``modelfleet.serve.client.Client``, which
    retries) from ``concurrency`` threads; stops at ``n``, at ``deadline_s`` or when ``stop`` is set.
    ``body`` is the request (prompt, max_tokens, ...). Failures are kept, never raised."""
    res, lock = LoadResult(), threading.Lock()
    t0 = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                if res.sent >= n or time.monotonic() - t0 > deadline_s or (stop is not None and stop.is_set()):
                    return
                res.sent += 1
            try:
                out = client.complete(**body)
                text = out["choices"][0]["text"]
                with lock:
                    res.ok += 1
                    res.texts[text] = res.texts.get(text, 0) + 1
            except Exception as e:  # noqa: BLE001 - a failed request is data here
                with lock:
                    res.failed.append(f"{type(e).__name__}: {str(e)[:200]}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s + 180)  # a request in flight at the deadline may still finish
    res.duration_s = time.monotonic() - t0
    return res


def publish_adapters(storage: Path, base: str, names: tuple[str, ...], probe: str = "def main(") -> dict[str, dict]:
    """Publish one LoRA adapter per name over the registry artifact ``base`` (random, non-zero
    low-rank weights: no training run) as ``<name>@v1``; returns, per name, its reference and its
    greedy 8-token answer to ``probe`` (what a pool must reproduce for a request naming it)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from modelfleet import registry
    from modelfleet.config import Config
    from modelfleet.data.tokenizer import ByteTokenizer
    from modelfleet.families.artifact import load_artifact
    from modelfleet.families.lora import write_adapter_dir
    from modelfleet.models.gpt import generate

    ref = registry.resolve(str(storage), base)
    manifest = registry.read_json(ref.uri, "manifest.json")
    cfg = Config.from_dict(manifest["config"])
    tok, out = ByteTokenizer(), {}
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        model, _, _ = load_artifact(ref.uri)
        # init_lora_weights=False: random A and B, so every adapter answers differently.
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
        ).eval()
        cfg.model.params = {
            "lora": {
                "base": ref.uri,
                "base_ref": f"{ref.name}@{ref.version}",
                "base_sha256": manifest["weights_sha256"],
                "r": 4,
                "alpha": 8.0,
                "target_modules": ["c_attn", "c_fc"],
            }
        }
        published = registry.publish(str(storage), name, write_adapter_dir(peft_model, cfg, {}), consume=True)
        ids = torch.tensor([tok.encode(probe)])
        with torch.no_grad():
            answer = tok.decode(generate(peft_model, ids, 8, temperature=0)[0, ids.size(1) :])
        out[name] = {"ref": f"{published.name}@{published.version}", "answer": answer}
    return out
