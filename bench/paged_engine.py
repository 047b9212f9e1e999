"""engine v2 (issue 25): the paged engine against the slot engine, in process, on the ``bench-lm``
preset's model (4 layers x 256 width, 1,024-token context, random weights: speed and memory do not
depend on training), one torch thread, all figures from one run:

* decode step at 16 rows x 512 context tokens: median seconds per decode step, paged / slot
  (target <= 1.15);
* prefix hit: TTFT of a prompt of 896 cached + 64 new tokens / the same prompt cold (target <= 1/5);
* no-hit cost: tokens/s with prefix caching on / off on a workload with no reuse, median of 9
  interleaved on/off pairs with the IQR (target >= 0.98), and the block manager's share of the
  step time from a cProfile of the caching-on run (target <= 1%);
* shared system prompts (8 of ~700 tokens, Zipf choice, a block budget holding about half of
  them): the engine's hit rate (cached prompt tokens / prompt tokens, its counters) against an
  offline LRU replay of the same requests and budget (target: within 2 points);
* ``hf-causal-lm``: tokens/s at concurrency 16 of a GPT-2-architecture model built with
  transformers, paged engine / the per-row slot path (target >= 4);
* KV memory on a mixed run (prompts uniform 16-512 tokens, outputs 8-256): unused token slots in
  allocated blocks / allocated token slots, averaged over steps (target <= 4%), and the mean
  running sequences at the KV memory of the slot engine's 8 slots, paged / slot (target >= 2).

Writes bench/results/paged_engine.json.

    python bench/paged_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time

from common import median, save, table

SEED = 25


def _model(device: str = "cpu"):
    import torch

    from modelfleet.families import build_model
    from modelfleet.presets import load_config

    torch.manual_seed(SEED)
    return build_model(load_config(preset="bench-lm").model).eval().to(device)


def _engine(model, kind: str, **cfg):
    from modelfleet.serve.engine import Engine, EngineConfig, SlotEngine

    cls = Engine if kind == "paged" else SlotEngine
    return cls(model, eos_id=-1, decode=lambda ids: "", config=EngineConfig(**cfg))  # no EOS: exact lengths


def _job(prompt: list[int], n: int):
    from modelfleet.serve.generation import Job

    return Job(prompt_ids=prompt, max_tokens=n, temperature=0)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def decode_step(model, rows: int, ctx: int, steps: int) -> dict[str, float]:
    """Median decode-step seconds with ``rows`` sequences at ``ctx`` tokens, per engine. The two
    engines' steps alternate, so a neighbour's load on the shared cores slows both alike."""
    engines = {}
    budget = steps + rows + 8  # decodes during the others' prefill, then the timed steps
    for kind in ("slot", "paged"):
        rng = random.Random(SEED)
        e = _engine(model, kind, max_num_seqs=rows, prefill_chunk=ctx, max_len=ctx + budget, max_waiting=rows)
        reqs = [e.add(_job(_prompt(rng, ctx), budget)) for _ in range(rows)]
        while not all(r.produced for r in reqs):  # prefill everyone (its first token comes out of it)
            e.step()
        engines[kind] = e
    times: dict[str, list[float]] = {kind: [] for kind in engines}
    for _ in range(steps):
        for kind, e in engines.items():
            t0 = time.perf_counter()
            r = e.step()
            times[kind].append(time.perf_counter() - t0)
            assert r.decoded == rows, r.decoded
    return {kind: median(t) for kind, t in times.items()}


def prefix_hit(model, repeats: int) -> dict[str, float]:
    """TTFT of 896 cached + 64 new prompt tokens vs the same 960 tokens cold (paged engine)."""
    rng = random.Random(SEED)
    shared = _prompt(rng, 896)
    cold, warm = [], []
    for _ in range(repeats):
        e = _engine(model, "paged", max_num_seqs=2, prefill_chunk=1024, max_len=1024)
        tail = _prompt(rng, 64)
        seed_req = e.add(_job(shared + _prompt(rng, 64), 1))  # puts the 896 shared tokens in the cache
        while e.has_work:
            e.step()
        for label, prompt in (("warm", shared + tail), ("cold", _prompt(rng, 960))):
            t0 = time.perf_counter()
            req = e.add(_job(prompt, 1))
            while not req.produced and e.has_work:
                e.step()
            (warm if label == "warm" else cold).append(time.perf_counter() - t0)
            if label == "warm":
                assert req.num_cached_tokens == 896, req.num_cached_tokens
        assert seed_req.num_cached_tokens == 0
    return {"ttft_warm_s": median(warm), "ttft_cold_s": median(cold)}


def _no_reuse_run(model, caching: bool, n: int, profile: cProfile.Profile | None = None) -> float:
    rng = random.Random(SEED + 1)
    e = _engine(model, "paged", max_num_seqs=16, prefill_chunk=64, max_len=512, enable_prefix_caching=caching)
    jobs = [_job(_prompt(rng, rng.randint(32, 128)), rng.randint(16, 48)) for _ in range(n)]
    t0, tokens, i = time.perf_counter(), 0, 0
    if profile:
        profile.enable()
    while i < len(jobs) or e.has_work:
        while i < len(jobs) and len(e.scheduler.waiting) + len(e.scheduler.running) < 16:
            e.add(jobs[i])
            i += 1
        tokens += sum(st.tokens for _, st in e.step().outputs)
    if profile:
        profile.disable()
    return tokens / (time.perf_counter() - t0)


def no_hit_cost(model, pairs: int, n: int) -> dict[str, float]:
    ratios = []
    for _ in range(pairs):
        on = _no_reuse_run(model, True, n)
        off = _no_reuse_run(model, False, n)
        ratios.append(on / off)
    q = statistics.quantiles(ratios, n=4)
    prof = cProfile.Profile()
    _no_reuse_run(model, True, n, prof)
    st = pstats.Stats(prof)
    total = max(v[3] for v in st.stats.values())  # the outermost frame's cumulative time
    blocks = sum(v[2] for k, v in st.stats.items() if k[0].endswith("serve/blocks.py"))  # own time
    return {"on_off_median": median(ratios), "on_off_iqr": q[2] - q[0], "block_manager_share": blocks / total}


def kv_memory(model, n: int) -> dict[str, float]:
    """The mixed run on equal KV memory: the slot engine's 8 full-context slots vs the same bytes of blocks."""
    rng = random.Random(SEED + 2)
    jobs = [(rng.randint(16, 512), rng.randint(8, 256)) for _ in range(n)]
    ctx, slots, bs = 1024, 8, 16
    result = {}
    for kind in ("slot", "paged"):
        cfg = {"max_num_seqs": slots if kind == "slot" else 64, "prefill_chunk": 128, "max_len": ctx, "max_waiting": n}
        if kind == "paged":
            cfg.update(block_size=bs, num_kv_blocks=slots * ctx // bs, enable_prefix_caching=False)
        e = _engine(model, kind, **cfg)
        r2 = random.Random(SEED + 3)
        for p, o in jobs:
            e.add(_job(_prompt(r2, p), o))
        running, waste = [], []
        while e.has_work:
            r = e.step()
            running.append(r.running)
            if kind == "paged" and e.blocks.num_used_blocks:
                used = e.blocks.num_used_blocks * bs
                filled = sum(min(s.num_tokens, len(s.block_table) * bs) for s in e.scheduler.running)
                waste.append(1 - filled / used)
        result[f"{kind}_mean_running"] = statistics.mean(running)
        if kind == "paged":
            result["unused_in_allocated_blocks"] = statistics.mean(waste)
            result["preemptions"] = e.scheduler.num_preemptions
    return result


def hf_batched(n: int, max_tokens: int, device: str = "cpu") -> dict[str, float]:
    """tokens/s at concurrency 16 for a GPT-2-architecture model built with transformers (the
    bench-lm shape): the paged engine (one forward per step) vs the per-row slot path."""
    import transformers

    from modelfleet.models.hf import HFCausalLM

    torch_seed = SEED
    import torch

    torch.manual_seed(torch_seed)
    cfg = transformers.GPT2Config(
        n_layer=4, n_head=4, n_embd=256, n_positions=1024, vocab_size=264, bos_token_id=0, eos_token_id=0
    )
    model = HFCausalLM(transformers.GPT2LMHeadModel(cfg).eval().to(device), block_size=1024)
    out = {}
    for kind in ("slot", "paged"):
        rng = random.Random(SEED + 4)
        e = _engine(model, kind, max_num_seqs=16, prefill_chunk=64, max_len=512, max_waiting=n)
        for _ in range(n):
            e.add(_job(_prompt(rng, 32), max_tokens))
        t0, tokens = time.perf_counter(), 0
        while e.has_work:
            tokens += sum(st.tokens for _, st in e.step().outputs)
        out[f"{kind}_tokens_per_s"] = tokens / (time.perf_counter() - t0)
    return out


def _lru_replay(requests: list[tuple[list[int], int]], capacity: int, bs: int) -> float:
    """Offline LRU over full-block prefix keys, the same requests in order, ``capacity`` blocks:
    cached prompt tokens / prompt tokens (at most ``n - 1`` tokens of a prompt hit, as in the engine)."""
    import collections

    from modelfleet.serve.blocks import block_hash

    lru: collections.OrderedDict[bytes, None] = collections.OrderedDict()
    hit = total = 0
    for prompt, out in requests:
        keys, parent = [], None
        for i in range(len(prompt) // bs):
            parent = block_hash(parent, prompt[i * bs : (i + 1) * bs], base_sha="")
            keys.append(parent)
        n = 0
        for k in keys[: (len(prompt) - 1) // bs]:
            if k not in lru:
                break
            n += 1
        hit, total = hit + n * bs, total + len(prompt)
        need = -(-(len(prompt) + out) // bs)
        for k in keys[:n]:
            lru.move_to_end(k)
        while lru and len(lru) + (need - n) > capacity:  # this request's new blocks push out the oldest
            lru.popitem(last=False)
        for k in keys[n:]:
            lru[k] = None
    return hit / total


def shared_system_prompts(model, n: int) -> dict[str, float]:
    """8 system prompts of ~700 tokens, ``n`` requests choosing one by Zipf, each with its own
    32-token question; a block budget holding about half the prompts beside the running sequences.
    Hit rate from the engine's counters vs the offline LRU replay of the same requests."""
    rng = random.Random(SEED + 5)
    bs, out = 16, 8
    systems = [_prompt(rng, rng.randint(680, 720)) for _ in range(8)]
    weights = [1 / (k + 1) for k in range(8)]
    requests = [(systems[rng.choices(range(8), weights)[0]] + _prompt(rng, 32), out) for _ in range(n)]
    per_prompt = -(-(720 + 32 + out) // bs)
    capacity = 4 * per_prompt + per_prompt  # ~half of the 8 prompts cached, plus the running one
    e = _engine(model, "paged", max_num_seqs=1, prefill_chunk=1024, max_len=1024, block_size=bs, num_kv_blocks=capacity)
    for p, o in requests:  # one at a time: the order the replay assumes
        e.add(_job(p, o))
        while e.has_work:
            e.step()
    c = e.blocks.counters
    return {
        "engine_hit_rate": c.hit_tokens / c.queried_tokens,
        "lru_replay_hit_rate": _lru_replay(requests, capacity, bs),
        "evictions": c.evictions,
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", help="where the models run (cuda on the GPU run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = _model(args.device)
    q = args.quick
    with torch.inference_mode():
        dec = decode_step(model, 16, 512, 8 if q else 30)
        hit = prefix_hit(model, 2 if q else 5)
        cost = no_hit_cost(model, 3 if q else 9, 24 if q else 48)
        mem = kv_memory(model, 24 if q else 64)
        sys_prompts = shared_system_prompts(model, 60 if q else 200)
        hf = hf_batched(16 if q else 32, 16 if q else 32, args.device)
    rows = [
        {"figure": "decode step paged / slot (16 x 512)", "value": dec["paged"] / dec["slot"], "target": "<= 1.15"},
        {
            "figure": "TTFT 896 cached + 64 new / cold",
            "value": hit["ttft_warm_s"] / hit["ttft_cold_s"],
            "target": "<= 0.2",
        },
        {"figure": "tokens/s caching on / off, no reuse", "value": cost["on_off_median"], "target": ">= 0.98"},
        {"figure": "block manager share of step time", "value": cost["block_manager_share"], "target": "<= 0.01"},
        {"figure": "unused KV in allocated blocks", "value": mem["unused_in_allocated_blocks"], "target": "<= 0.04"},
        {
            "figure": "running sequences at equal KV, paged / slot",
            "value": mem["paged_mean_running"] / mem["slot_mean_running"],
            "target": ">= 2",
        },
        {
            "figure": "shared system prompts: hit rate engine - LRU replay (points)",
            "value": 100 * (sys_prompts["engine_hit_rate"] - sys_prompts["lru_replay_hit_rate"]),
            "target": "within +-2",
        },
        {
            "figure": "hf GPT-2 tokens/s c16, paged / per-row",
            "value": hf["paged_tokens_per_s"] / hf["slot_tokens_per_s"],
            "target": ">= 4",
        },
    ]
    print(table(rows, ["figure", "value", "target"]))
    keys = ("decode_step_paged_over_slot", "ttft_hit_over_cold", "caching_on_over_off", "block_manager_share")
    keys += ("unused_kv_in_blocks", "running_paged_over_slot", "hit_rate_minus_lru_points", "hf_paged_over_per_row")
    ratios = {k: r["value"] for k, r in zip(keys, rows)}
    out = save(
        "paged_engine",
        {
            "quick": q,
            "device": args.device,
            "decode_step_s": dec,
            "prefix_hit": hit,
            "no_hit_cost": cost,
            "kv_memory": mem,
            "hf": hf,
            "shared_system_prompts": sys_prompts,
            "ratios": ratios,
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
