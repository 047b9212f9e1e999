"""The continuous-batching engine (serve/engine.py), in process: no Ray, no HTTP."""

from __future__ import annotations

import threading

import pytest
import torch

from modelfleet.config import ModelConfig
from modelfleet.serve.engine import Engine, EngineConfig, EngineFull, EngineLoop, SlotEngine, StepOutput
from modelfleet.serve.generation import Job, generate_steps

EOS = 256
PROMPTS = [[10, 20, 30, 40, 50], [7], [1, 2, 3], list(range(60, 90)), [200, 100], list(range(1, 13))]


@pytest.fixture(scope="module", autouse=True)
def _fixed_threads():
    # Batched matmuls may round differently with other thread counts; the test fixes it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    from modelfleet.families import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def _text(ids):
    return bytes(i for i in ids if i < 256).decode("latin-1")


def _engine(model, **cfg) -> Engine:
    return Engine(model, eos_id=EOS, decode=_text, config=EngineConfig(**cfg))


def _drain(engine: Engine, seqs, *, on_step=None):
    """Step until idle; per sequence: text, token count, finish reason."""
    out = {id(s): ["", 0, None] for s in seqs}
    n = 0
    while engine.has_work:
        result = engine.step()
        n += 1
        if on_step:
            on_step(n, result)
        for s, st in result.outputs:
            r = out.setdefault(id(s), ["", 0, None])
            r[0] += st.text
            r[1] += st.tokens
            r[2] = st.finish_reason or r[2]
    return out


def _alone(model, job: Job) -> str:
    """The static decoder with this one request: the reference."""
    return "".join(o[0].text for o in generate_steps(model, [job], eos_id=EOS, decode=_text) if o[0])


def test_slot_forward_matches_each_sequence_alone(model):
    """Rows of different lengths in one forward compute what each computes alone (within 1e-5)."""
    cache = model.new_slot_cache(4, 64)
    seqs = [PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[5]]
    with torch.inference_mode():
        for slot, p in enumerate(seqs):  # prefill all but the last token, one slot each
            model.forward_slots(torch.tensor([p[:-1] or p[:1]]), cache, [slot], [0])
        idx = torch.tensor([[p[-1]] for p in seqs])
        starts = [max(len(p) - 1, 0) for p in seqs]  # the one-token prompt overwrites its only entry
        batched = model.forward_slots(idx, cache, [0, 1, 2, 3], starts)[:, -1]
        gathered = model.forward_slots(idx[[3, 1, 0, 2]], cache, [3, 1, 0, 2], [starts[i] for i in [3, 1, 0, 2]])[:, -1]
        for b, p in enumerate(seqs):
            alone = model(torch.tensor([p]))[0, -1]
            assert torch.allclose(batched[b], alone, atol=1e-5), (b, (batched[b] - alone).abs().max())
        for row, slot in enumerate([3, 1, 0, 2]):  # non-consecutive slots: the gathered path
            assert torch.allclose(gathered[row], batched[slot], atol=1e-5)


def test_greedy_in_a_batch_equals_one_at_a_time(model):
    jobs = [Job(prompt_ids=p, max_tokens=k, temperature=0) for p, k in zip(PROMPTS, [6, 20, 3, 9, 14, 5])]
    engine = _engine(model, max_num_seqs=4, prefill_chunk=8)
    seqs = [engine.add(j) for j in jobs]
    got = _drain(engine, seqs)
    for j, s in zip(jobs, seqs):
        assert got[id(s)][0] == _alone(model, j)
        assert got[id(s)][1] == j.max_tokens or got[id(s)][2] == "stop"


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch(model, temperature, top_p):
    job = Job(prompt_ids=[3, 1, 4, 1, 5], max_tokens=12, temperature=temperature, top_p=top_p, seed=42)
    alone = _engine(model)
    s = alone.add(job)
    ref = _drain(alone, [s])[id(s)][0]
    assert ref == _alone(model, job)
    busy = _engine(model, max_num_seqs=3, prefill_chunk=4)
    others = [busy.add(Job(prompt_ids=p, max_tokens=10, temperature=1.0)) for p in PROMPTS[:2]]
    late = []

    def join_late(n, _):  # the seeded request arrives mid-batch, next to unseeded strangers
        if n == 3:
            late.append(busy.add(job))
            others.append(busy.add(Job(prompt_ids=PROMPTS[4], max_tokens=8, temperature=1.0)))

    got = _drain(busy, others, on_step=join_late)
    assert got[id(late[0])][0] == ref
    unseeded = _drain(
        e := _engine(model),
        [x := e.add(Job(prompt_ids=job.prompt_ids, max_tokens=12, temperature=temperature, top_p=top_p))],
    )[id(x)][0]
    assert unseeded != ref or temperature == 0  # the sampling really samples


def test_requests_join_and_leave_between_decode_steps(model):
    engine = _engine(model, max_num_seqs=2, prefill_chunk=64)
    long = engine.add(Job(prompt_ids=[1, 2], max_tokens=30, temperature=0))
    short = engine.add(Job(prompt_ids=[5], max_tokens=3, temperature=0))
    queued = engine.add(Job(prompt_ids=[9, 9], max_tokens=4, temperature=0))
    produced_at: dict[str, list[int]] = {"long": [], "short": [], "queued": []}
    names = {id(long): "long", id(short): "short", id(queued): "queued"}
    waiting = []

    def record(n, result: StepOutput):
        waiting.append(result.waiting)
        for s, _ in result.outputs:
            produced_at[names[id(s)]].append(n)

    got = _drain(engine, [long, short, queued], on_step=record)
    assert waiting[0] == 1  # two slots: the third request waits
    # The short one leaves after 3 tokens; the queued one takes its slot while the long one runs on.
    assert produced_at["short"][-1] < produced_at["queued"][0] < produced_at["long"][-1]
    assert len(produced_at["long"]) == 30 and produced_at["long"] == list(range(1, 31))  # never stalled
    assert got[id(queued)][0] == _alone(model, queued.job) and got[id(long)][0] == _alone(model, long.job)


def test_a_long_prompt_is_prefilled_in_chunks_while_running_streams_keep_decoding(model):
    engine = _engine(model, max_num_seqs=2, prefill_chunk=8)
    running = engine.add(Job(prompt_ids=[4], max_tokens=20, temperature=0))
    engine.step()
    engine.step()
    long_prompt = engine.add(Job(prompt_ids=list(range(1, 41)), max_tokens=4, temperature=0))
    steps_until_first = 0
    while not long_prompt.produced:
        result = engine.step()
        steps_until_first += 1
        assert any(s is running for s, _ in result.outputs)  # a token every step during the prefill
    assert steps_until_first == 5  # 40 prompt tokens / 8 per step
    got = _drain(engine, [running, long_prompt])
    assert long_prompt.row.ids and _text(long_prompt.row.ids) == _alone(model, long_prompt.job)
    assert got[id(running)][1] + 2 + steps_until_first >= 20


def test_stop_strings_across_token_boundaries_end_the_request(model):
    full = _alone(model, Job(prompt_ids=[3, 4], max_tokens=12, temperature=0))
    stop = full[4:7]  # three single-byte tokens: the stop string spans token boundaries
    engine = _engine(model, max_num_seqs=2)
    s = engine.add(Job(prompt_ids=[3, 4], max_tokens=12, temperature=0, stop=[stop]))
    other = engine.add(Job(prompt_ids=[8], max_tokens=12, temperature=0))
    got = _drain(engine, [s, other])
    assert got[id(s)][0] == full[: full.index(stop)] and got[id(s)][2] == "stop"
    assert got[id(other)][2] == "length"


def test_a_full_cache_queues_requests_and_a_full_queue_refuses(model):
    engine = _engine(model, max_num_seqs=2, max_waiting=4)
    seqs = [engine.add(Job(prompt_ids=[i + 1], max_tokens=5, temperature=0)) for i in range(4)]
    with pytest.raises(EngineFull, match="4 requests already wait for one of 2 sequence slots"):
        engine.add(Job(prompt_ids=[1], max_tokens=5))
    with pytest.raises(ValueError, match="exceeds the engine's 64-token context"):
        engine.add(Job(prompt_ids=[1] * 60, max_tokens=5))
    peak = []
    got = _drain(engine, seqs, on_step=lambda n, r: peak.append((r.running, r.waiting)))
    assert peak[0] == (2, 2) and max(r for r, _ in peak) == 2 and engine.cache_use == 0
    assert all(got[id(s)][1] == 5 for s in seqs)


def test_cancelled_requests_free_their_slot(model):
    engine = _engine(model, max_num_seqs=1)
    gone = engine.add(Job(prompt_ids=[1], max_tokens=30, temperature=0))
    engine.step()
    nxt = engine.add(Job(prompt_ids=[2], max_tokens=3, temperature=0))
    engine.cancel(gone)
    got = _drain(engine, [nxt])
    assert got[id(nxt)][1] == 3 and gone.produced == 1


def test_the_loop_thread_wakes_its_consumer_once_per_step(model):
    engine = _engine(model, max_num_seqs=4)
    calls: list[StepOutput] = []
    done = threading.Event()
    texts: dict[int, str] = {}
    jobs = [Job(prompt_ids=p, max_tokens=6, temperature=0) for p in PROMPTS[:3]]
    finished = set()

    def deliver(result: StepOutput, _loop) -> None:  # on the engine thread
        calls.append(result)
        for s, st in result.outputs:
            texts[id(s.job)] = texts.get(id(s.job), "") + st.text
            if st.finish_reason:
                finished.add(id(s.job))
        if len(finished) == len(jobs):
            done.set()

    loop = EngineLoop(engine, deliver)
    try:
        for j in jobs:
            loop.submit(j)
        assert done.wait(60)
    finally:
        loop.stop()
    tokens = sum(len(r.outputs) for r in calls)
    assert len(calls) < tokens  # one wake-up per step, not per token per request
    assert all(texts[id(j)] == _alone(model, j) for j in jobs)
    assert loop.error is None


def test_a_failed_decoding_thread_reports_once_and_refuses_new_work(model):
    class Broken(torch.nn.Module):
        cfg = model.cfg

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def new_slot_cache(self, n, max_len, device=None):
            return model.new_slot_cache(n, max_len)

        def forward_slots(self, *args):
            raise RuntimeError("CUDA error: device-side assert")

    # The slot engine lets a step's error end the loop (the paged engine fails only that step's
    # sequences: test_paged_engine.py); the loop reports it once and refuses new work.
    engine = SlotEngine(Broken(), eos_id=EOS, decode=_text, config=EngineConfig(max_num_seqs=2))
    seen, failed = [], threading.Event()
    loop = EngineLoop(engine, lambda result, lp: (seen.append(lp.error), failed.set()))
    loop.submit(Job(prompt_ids=[1], max_tokens=3))
    assert failed.wait(30)
    assert len(seen) == 1 and "device-side assert" in repr(seen[0])
    with pytest.raises(EngineFull, match="decoding thread is down"):
        loop.submit(Job(prompt_ids=[1], max_tokens=3))


def test_a_burst_of_equal_prompts_prefills_in_one_step(model):
    engine = _engine(model, max_num_seqs=4, prefill_chunk=64)
    jobs = [Job(prompt_ids=[5 + i, 6, 7, 8, 9], max_tokens=6, temperature=0) for i in range(4)]
    seqs = [engine.add(j) for j in jobs]
    first = engine.step()
    assert {id(s) for s, _ in first.outputs} == {id(s) for s in seqs}  # one step: all four prefilled
    got = _drain(engine, seqs)
    for j, s in zip(jobs, seqs):
        assert first.outputs[[id(x) for x, _ in first.outputs].index(id(s))][1].text + got[id(s)][0] == _alone(model, j)


def test_text_streams_per_token_even_when_the_model_emits_invalid_bytes():
    """Each token's text is shown at its own step: a multi-byte character waits only until it is
    complete, and bytes no later byte can mend (U+FFFD before the last character) are shown at
    once. Holding back every trailing U+FFFD held a model's whole output until its end."""
    from modelfleet.data.tokenizer import ByteTokenizer
    from modelfleet.serve.generation import _Row

    tok = ByteTokenizer()
    row = _Row(Job(prompt_ids=[1], max_tokens=10, temperature=0), EOS, tok.decode)
    euro = list("€".encode())  # three bytes, three tokens
    assert [row.push(t).text for t in euro] == ["", "", "€"]
    # 0xFF never starts a character: each one is final as soon as the next token arrives.
    assert [row.push(0xFF).text for _ in range(4)] == ["", "\ufffd", "\ufffd", "\ufffd"]
    last = row.push(ord("a"))
    assert last.text == "\ufffda" and last.finish_reason is None
    end = row.push(EOS)
    assert end.finish_reason == "stop" and end.text == ""
