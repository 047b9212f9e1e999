"""``make demo``: the mission on one machine, with the project's own commands and a real cluster."""

from __future__ import annotations

import os
import time

from modelfleet.config import Config


def run_demo(cfg: Config) -> int:
    from modelfleet.data.prepare import prepare_dataset
    from modelfleet.data.tokenizer import ByteTokenizer
    from modelfleet.train.trainer import train

    t0 = time.time()
    print(f"== modelfleet demo: preset {cfg.preset}, ZeRO-{cfg.deepspeed.zero_stage}, "
          f"{cfg.train.num_workers} workers, {cfg.train.max_steps} steps")
    if not os.path.isfile(os.path.join(cfg.data.path, "meta.json")):
        meta = prepare_dataset(cfg.data, cfg.model.block_size, ByteTokenizer())
        print(f"== prepared {meta['train_rows']} train / {meta['val_rows']} val sequences "
              f"from {meta['num_documents']} Python stdlib files -> {cfg.data.path}")
    res = train(cfg)
    evals = [m for m in _read_metrics(res.run_dir) if m["kind"] == "eval"]
    print("== validation loss by step: " + ", ".join(f"{e['step']}: {e['val_loss']:.3f}" for e in evals))
    if len(evals) >= 2 and evals[-1]["val_loss"] < evals[0]["val_loss"]:
        print(f"== validation loss fell {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}")
    print(f"== time to first step {res.timings.get('time_to_first_step_s', float('nan')):.1f} s, "
          f"total {time.time() - t0:.1f} s")
    print(f"== artifact: {res.artifact.uri}" if res.artifact else "== no artifact exported")
    return 0


def _read_metrics(run_dir: str) -> list[dict]:
    import json

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
