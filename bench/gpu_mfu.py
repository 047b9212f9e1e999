"""GPU benchmark: MFU and tokens/s of modelfleet's GPT under DeepSpeed bf16 ZeRO-2/3 on one GPU,
against the GPU's measured large-GEMM bf16 FLOP/s (the baseline, taken in the same run), plus
in-process generation latency with the KV cache.

The engine is built exactly as a Ray Train worker builds it (``build_model`` + ``build_ds_config``
from a preset), in one process with a world of one, so the figure is the model + DeepSpeed cost
without Ray's (Ray's per-step overhead is measured on CPU by ``bench/train_overhead.py``).

    python bench/gpu_mfu.py --presets gpt2-124m gpt-1b --stages 2 3 --out bench/results/gpu_mfu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runnable from a bare checkout


def gemm_flops(n: int = 8192, reps: int = 20) -> float:
    """bf16 FLOP/s of an n x n x n matmul on random data: the roofline MFU is quoted against."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def train_case(
    preset: str, stage: int, steps: int, overrides: list[str], peak: float, compile_model: bool
) -> dict[str, Any]:
    import deepspeed
    import torch

    from modelfleet.families import build_model
    from modelfleet.models import flops_per_token, num_params
    from modelfleet.presets import load_config
    from modelfleet.train.deepspeed import build_ds_config, lr_lambda

    # The preset's own gradient accumulation: one optimizer step per grad_accum micro-batches,
    # as a real run does (one micro-batch per step would charge the optimizer 8x too often).
    cfg = load_config(preset=preset, overrides=[f"deepspeed.zero_stage={stage}", "train.num_workers=1", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=build_ds_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    if compile_model:
        engine.compile()
    mbs, T, ga = cfg.train.micro_batch_size, cfg.model.block_size, cfg.train.grad_accum
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = torch.randint(0, cfg.model.vocab_size, (8, mbs, T + 1), device="cuda", generator=gen)
    times, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for j in range(ga):
            seq = data[(i * ga + j) % len(data)]
            loss = engine(seq[:, :-1], seq[:, 1:])
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = times[max(2, steps // 4) :]  # warm-up (allocator, kernels autotune, compile) left out
    step_s = statistics.median(steady)
    tokens = mbs * T * ga
    fpt = flops_per_token(cfg.model)
    achieved = tokens * fpt / step_s
    # Activation checkpointing re-runs each block's forward: hardware does ~4/3 of the model FLOPs.
    hw = achieved * (4 / 3 if cfg.train.activation_checkpointing else 1.0)
    res = {
        "preset": preset,
        "zero_stage": stage,
        "micro_batch": mbs,
        "grad_accum": ga,
        "seq_len": T,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "compiled": compile_model,
        "params": num_params(engine.module),
        "flops_per_token": fpt,
        "step_s_median": step_s,
        "step_s_p90": sorted(steady)[int(0.9 * (len(steady) - 1))],
        "tokens_per_s": tokens / step_s,
        "model_tflops": achieved / 1e12,
        "mfu_vs_measured_gemm": achieved / peak,
        "hfu_vs_measured_gemm": hw / peak,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": steps,
    }
    del engine, model
    torch.cuda.empty_cache()
    return res


def generation_latency(preset: str, batch_sizes: list[int], prompt: int = 20, new: int = 16) -> list[dict]:
    import torch

    from modelfleet.families import build_model
    from modelfleet.models import generate
    from modelfleet.presets import load_config

    cfg = load_config(preset=preset)
    model = build_model(cfg.model).to("cuda", torch.bfloat16).eval()
    out = []
    for bs in batch_sizes:
        idx = torch.randint(0, cfg.model.vocab_size, (bs, prompt), device="cuda")
        lat, fwd = [], []
        for i in range(25):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(idx)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            generate(model, idx, new, temperature=0)
            torch.cuda.synchronize()
            if i >= 5:
                fwd.append(t1 - t0)
                lat.append(time.perf_counter() - t1)
        out.append(
            {
                "preset": preset,
                "batch": bs,
                "prompt_tokens": prompt,
                "new_tokens": new,
                "forward_ms_p50": 1e3 * statistics.median(fwd),
                "generate_ms_p50": 1e3 * statistics.median(lat),
                "tokens_per_s": bs * new / statistics.median(lat),
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["gpt2-124m", "gpt-1b"])
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps (each grad_accum micro-batches)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    ap.add_argument(
        "--no-ckpt-variant", action="store_true", help="skip the extra gpt-1b run without activation checkpointing"
    )
    ap.add_argument("--no-generation", action="store_true", help="skip the generation-latency part")
    ap.add_argument("--compile", action="store_true", help="also measure with engine.compile()")
    ap.add_argument("--out", default="bench/results/gpu_mfu.json")
    args = ap.parse_args()

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        os.environ.setdefault(k, v)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    deepspeed.init_distributed("nccl")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = gemm_flops()
    print(f"measured bf16 GEMM: {peak / 1e12:.0f} TFLOP/s")
    cases = []
    for preset in args.presets:
        variants: list[tuple[list[str], bool]] = [([], False)]
        if preset == "gpt-1b" and not args.no_ckpt_variant:
            variants.append((["train.activation_checkpointing=false"], False))
        if args.compile and preset == "gpt2-124m":
            variants.append(([], True))
        for stage in args.stages:
            for extra, comp in variants:
                if stage == 3 and extra:  # gpt-1b ZeRO-3 without checkpointing: OOM at 80 GB (measured)
                    continue
                try:
                    r = train_case(preset, stage, args.steps, [*args.overrides, *extra], peak, comp)
                except Exception as e:  # noqa: BLE001 - one failed case (OOM, compile) must not hide the rest
                    r = {
                        "preset": preset,
                        "zero_stage": stage,
                        "overrides": extra,
                        "compiled": comp,
                        "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                    }
                    torch.cuda.empty_cache()
                cases.append(r)
                print(json.dumps(r))
    gen = []
    for preset in [] if args.no_generation else args.presets:
        gen += generation_latency(preset, [1, 16])
    for g in gen:
        print(json.dumps(g))
    result = {
        "name": "gpu_mfu",
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "measured_gemm_tflops": peak / 1e12,
        "training": cases,
        "generation": gen,
        "target": "MFU >= 0.5 of the measured large-GEMM FLOP/s",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'preset':10} {'stage':5} {'ckpt':5} {'comp':5} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8}")
    for c in cases:
        if "error" in c:
            print(f"{c['preset']:10} {c['zero_stage']:<5} error: {c['error']}")
            continue
        print(
            f"{c['preset']:10} {c['zero_stage']:<5} {str(c['activation_checkpointing'])[0]:5} "
            f"{str(c['compiled'])[0]:5} {c['tokens_per_s']:10.0f} {c['model_tflops']:8.1f} "
            f"{c['mfu_vs_measured_gemm']:6.1%} {c['peak_mem_gib']:8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
