"""The paged engine (serve/engine.py over models/paged_kv.py) in process: the paged forward, exactness
against the slot engine and the static decoder, prefix caching and preemption. No Ray, no HTTP."""

from __future__ import annotations

import pytest
import torch

from modelfleet.config import ModelConfig
from modelfleet.serve.engine import Engine, EngineConfig, SlotEngine
from modelfleet.serve.generation import Job, generate_steps

EOS = 256
PROMPTS = [[10, 20, 30, 40, 50], [7], [1, 2, 3], list(range(60, 90)), [200, 100], list(range(1, 13))]


@pytest.fixture(scope="module", autouse=True)
def _fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # batched matmuls may round differently with other thread counts
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    from modelfleet.families import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def _text(ids):
    return bytes(i for i in ids if i < 256).decode("latin-1")


def _alone(model, job: Job) -> str:
    return "".join(o[0].text for o in generate_steps(model, [job], eos_id=EOS, decode=_text) if o[0])


def _run(engine, jobs, *, add_at=None):
    """Drain ``engine``; ``add_at[n]`` jobs join before step n. Returns each job's text, in order."""
    add_at = add_at or {0: jobs}
    reqs, text = [], {}
    n = 0
    while n in add_at or engine.has_work or any(k > n for k in add_at):
        for j in add_at.get(n, []):
            reqs.append(engine.add(j))
        for r, st in engine.step().outputs:
            text[id(r)] = text.get(id(r), "") + st.text
        n += 1
    return [text.get(id(r), "") for r in reqs], reqs


def test_paged_forward_of_mixed_prefill_chunks_and_decodes_matches_each_sequence_alone(model):
    """One forward holding prompt chunks of different lengths and one-token decodes, sequences
    with scattered (non-consecutive, interleaved) blocks: each row's logits equal the sequence
    run alone within 1e-5."""
    cache = model.new_paged_cache(24, 4)
    tables = [[5, 1], [9], [0], [2, 11, 3, 13, 4, 15, 6, 17], [8, 7, 10]]
    seqs = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3], list(range(30, 41))]
    with torch.inference_mode():
        # Step 1: all but each prompt's last token (or its only token), mixed lengths in one forward.
        first = [p[:-1] or p[:1] for p in seqs]
        model.forward_paged(torch.tensor(sum(first, [])), cache, tables, [0] * 5, [len(f) for f in first])
        # Step 2: the last tokens, one per sequence (a decode-shaped step).
        starts = [max(len(p) - 1, 0) for p in seqs]
        last = model.forward_paged(torch.tensor([p[-1] for p in seqs]), cache, tables, starts, [1] * 5)
        for b, p in enumerate(seqs):
            alone = model(torch.tensor([p]))[0, -1]
            assert torch.allclose(last[b], alone, atol=1e-5), (b, (last[b] - alone).abs().max())
        with pytest.raises(ValueError, match="need more than its 1 blocks"):
            model.forward_paged(torch.tensor([1, 2, 3, 4, 5]), cache, [[0]], [0], [5])


def test_paged_engine_greedy_equals_the_slot_engine_and_the_static_decoder(model):
    jobs = [Job(prompt_ids=p, max_tokens=k, temperature=0) for p, k in zip(PROMPTS, [6, 20, 3, 9, 14, 5])]
    cfg = {"max_num_seqs": 4, "prefill_chunk": 8}
    paged, reqs = _run(Engine(model, eos_id=EOS, decode=_text, config=EngineConfig(**cfg, block_size=4)), jobs)
    slot, _ = _run(SlotEngine(model, eos_id=EOS, decode=_text, config=EngineConfig(**cfg)), jobs)
    assert paged == slot == [_alone(model, j) for j in jobs]
    assert all(r.status.done and not r.block_table for r in reqs)  # finished: blocks returned


def test_one_forward_per_step_for_every_scheduled_sequence(model):
    engine = Engine(model, eos_id=EOS, decode=_text, config=EngineConfig(max_num_seqs=4, prefill_chunk=8))
    for p in PROMPTS[:4]:
        engine.add(Job(prompt_ids=p, max_tokens=5, temperature=0))
    steps = batched = 0
    while engine.has_work:
        out = engine.step()
        steps += 1
        batched = max(batched, out.decoded)
    assert engine.runner.forwards == steps and batched == 4


def test_a_repeated_prefix_is_served_from_the_cache_and_decodes_exactly_as_without_it(model):
    system = list(range(100, 140))  # 40 tokens: 10 full blocks of 4
    jobs = [Job(prompt_ids=system + tail, max_tokens=8, temperature=0) for tail in ([1, 2], [3], [1, 2])]
    later = {0: jobs[:1], 12: jobs[1:]}  # the first has finished (its blocks free, still cached) when the rest arrive

    def engine(caching: bool) -> Engine:
        return Engine(
            model,
            eos_id=EOS,
            decode=_text,
            config=EngineConfig(max_num_seqs=4, prefill_chunk=16, block_size=4, enable_prefix_caching=caching),
        )

    on = engine(True)
    got_on, reqs = _run(on, jobs, add_at=later)
    got_off, reqs_off = _run(engine(False), jobs, add_at=later)
    assert got_on == got_off == [_alone(model, j) for j in jobs]
    assert [r.num_cached_tokens for r in reqs] == [0, 40, 40]  # whole blocks only, never the last token
    assert [r.num_cached_tokens for r in reqs_off] == [0, 0, 0]
    c = on.blocks.counters
    assert (c.queried_tokens, c.hit_tokens) == (42 + 41 + 42, 80)
    # The third request repeats the first one whole: 42 tokens, 10 full blocks + 2, of which the
    # cache serves the 10 blocks; its prefill ran on 2 tokens instead of 42.


def test_preempted_sequences_continue_their_streams_without_a_changed_token(model):
    """A pool too small for everyone at once: the newest running sequence gives its blocks back and
    is recomputed later; greedy and seeded streams equal those of an engine that never preempts."""
    jobs = [Job(prompt_ids=p, max_tokens=24, temperature=0) for p in PROMPTS[:4]]
    jobs += [Job(prompt_ids=PROMPTS[4], max_tokens=24, temperature=0.9, top_p=0.9, seed=7)]
    roomy, _ = _run(Engine(model, eos_id=EOS, decode=_text, config=EngineConfig(max_num_seqs=5, block_size=4)), jobs)
    tight = Engine(model, eos_id=EOS, decode=_text, config=EngineConfig(max_num_seqs=5, block_size=4, num_kv_blocks=24))
    got, reqs = _run(tight, jobs)
    assert tight.scheduler.num_preemptions > 0 and any(r.num_preemptions for r in reqs)
    assert got == roomy
    assert got[:4] == [_alone(model, j) for j in jobs[:4]]
    assert tight.blocks.num_used_blocks == 0


def _engine(model, **cfg) -> Engine:
    return Engine(model, eos_id=EOS, decode=_text, config=EngineConfig(**{"max_num_seqs": 4, "block_size": 4, **cfg}))


def test_non_finite_logits_in_one_row_fail_that_request_alone(model):
    engine = _engine(model)
    jobs = [Job(prompt_ids=p, max_tokens=10, temperature=0) for p in PROMPTS[:3]]
    reqs = [engine.add(j) for j in jobs]
    real, steps = engine.runner.run, [0]

    def poisoned(batch, adapters):  # the third step: the second request's row goes NaN
        logits = real(batch, adapters)
        steps[0] += 1
        if steps[0] == 3:
            logits[[s.seq for s in batch].index(reqs[1])] = float("nan")
        return logits

    engine.runner.run = poisoned
    text: dict[int, str] = {}
    reasons: dict[int, str] = {}
    while engine.has_work:
        for r, st in engine.step().outputs:
            text[id(r)] = text.get(id(r), "") + st.text
            reasons[id(r)] = st.finish_reason or reasons.get(id(r), "")
    assert reasons[id(reqs[1])] == "error" and "non-finite logits" in reqs[1].error
    assert reqs[1].status.name == "FAILED" and not reqs[1].block_table
    for j, r in zip(jobs, reqs):
        if r is not reqs[1]:
            assert text[id(r)] == _alone(model, j) and reasons[id(r)] == "length"
    assert engine.healthy and engine.blocks.num_used_blocks == 0


def test_a_failed_step_fails_its_sequences_frees_their_blocks_and_the_engine_serves_on(model):
    engine = _engine(model, max_failed_steps=2)
    real = engine.runner.run

    def broken(batch, adapters):
        raise RuntimeError("CUDA out of memory")

    engine.runner.run = broken
    doomed = [engine.add(Job(prompt_ids=p, max_tokens=5, temperature=0)) for p in PROMPTS[:2]]
    out = engine.step()
    assert {id(r) for r, st in out.outputs if st.finish_reason == "error"} == {id(r) for r in doomed}
    assert all("out of memory" in r.error for r in doomed)
    assert engine.blocks.num_used_blocks == 0 and engine.blocks.num_cached_blocks == 0  # nothing published
    assert engine.healthy  # one failed step is not a broken replica
    engine.runner.run = real
    job = Job(prompt_ids=PROMPTS[0], max_tokens=6, temperature=0)
    got, _ = _run(engine, [job])
    assert got == [_alone(model, job)] and engine.failed_steps_in_a_row == 0
    engine.runner.run = broken
    for _ in range(2):
        engine.add(Job(prompt_ids=[1], max_tokens=2))
        engine.step()
    assert not engine.healthy  # two in a row (max_failed_steps=2): the health check fails
