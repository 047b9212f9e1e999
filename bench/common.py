"""What every benchmark shares: the machine description, percentiles, the tiny dataset, and
writing ``bench/results/<name>.json`` with versions and raw figures."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runnable from a bare checkout too
RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def machine() -> dict[str, Any]:
    import torch

    info = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("ray", "deepspeed"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        info["load_avg_1m"] = os.getloadavg()[0]  # how busy the shared machine was at the start
    except OSError:
        pass
    return info


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def tiny_dataset(root: Path, block_size: int = 128) -> str:
    """The tests' offline corpus (Python's own json/ and email/ sources), prepared once."""
    from modelfleet.config import DataConfig
    from modelfleet.data.prepare import prepare_dataset
    from modelfleet.data.tokenizer import ByteTokenizer

    path = root / f"data-{block_size}"
    if not (path / "meta.json").exists():
        prepare_dataset(
            DataConfig(sources=["stdlib:json/*.py", "stdlib:email/*.py"], path=str(path)), block_size, ByteTokenizer()
        )
    return str(path)


def step_times(run_dir: str, cfg: Any) -> list[float]:
    """Seconds of each training step from a run's metrics.jsonl: each step record's tokens/s
    covers exactly that step (eval and checkpoint time excluded)."""
    recs = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.num_workers * cfg.model.block_size
    return [tokens_per_step / r["tokens_per_s"] for r in recs if r["kind"] == "step"]


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    full = {"name": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **result}
    out.write_text(json.dumps(full, indent=1, default=float) + "\n")
    return out


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    lines += ["  ".join(fmt(r.get(c, "")).rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
