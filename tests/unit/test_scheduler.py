"""The scheduler (serve/scheduler.py) over a real BlockManager, without a model: a fake "model"
samples token ``100 + position`` so a stream can be checked token by token."""

from __future__ import annotations

import pytest

from modelfleet.serve.blocks import BlockManager
from modelfleet.serve.scheduler import QueueFull, Scheduler, SchedulerConfig, SchedulerOutput
from modelfleet.serve.sequence import Sequence, SequenceStatus

BS = 4


def _sched(num_blocks: int = 64, **cfg) -> Scheduler:
    return Scheduler(BlockManager(num_blocks=num_blocks, block_size=BS), SchedulerConfig(**cfg))


def _token(seq: Sequence) -> int:
    """What the fake model samples: a function of the position only, like seeded sampling."""
    return 100 + seq.num_tokens


def _step(s: Scheduler) -> SchedulerOutput:
    """schedule -> (run) -> update, as the engine does."""
    out = s.schedule()
    s.commit(out)
    for item in out.scheduled:
        if item.samples:
            item.seq.append_token(_token(item.seq))
            if len(item.seq.output_ids) >= item.seq.max_tokens:
                s.finish(item.seq)
    return out


def _run(s: Scheduler, limit: int = 500) -> list[SchedulerOutput]:
    outs = []
    while s.has_work:
        outs.append(_step(s))
        assert len(outs) < limit, "the scheduler stopped making progress"
    return outs


def test_prefill_in_chunks_within_the_token_budget_then_decode_one_token_a_step():
    s = _sched(prefill_chunk=8, max_num_batched_tokens=10)
    long, short = Sequence(list(range(20)), max_tokens=3), Sequence([1, 2], max_tokens=3)
    s.add(long)
    s.add(short)
    first = _step(s)
    assert [(x.seq, x.num_tokens) for x in first.scheduled] == [(long, 8), (short, 2)]
    assert first.num_batched_tokens == 10 and short.output_ids == [102]  # short's prompt done: it sampled
    second = _step(s)
    assert [(x.seq, x.num_tokens) for x in second.scheduled] == [(long, 8), (short, 1)]
    third = _step(s)
    assert [(x.seq, x.num_tokens, x.samples) for x in third.scheduled] == [(long, 4, True), (short, 1, True)]
    _run(s)
    assert long.output_ids == [120, 121, 122] and short.output_ids == [102, 103, 104]
    assert all(x.status is SequenceStatus.FINISHED for x in (long, short))
    assert s.blocks.num_used_blocks == 0


def test_admission_waits_for_a_sequence_slot_and_for_blocks():
    s = _sched(max_num_seqs=2)
    seqs = [Sequence([i + 1], max_tokens=2) for i in range(3)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [x.seq for x in out.scheduled] == seqs[:2] and list(s.waiting) == [seqs[2]]
    s2 = _sched(num_blocks=3)
    a, b = Sequence(list(range(8)), max_tokens=4), Sequence(list(range(50, 58)), max_tokens=4)
    s2.add(a)
    s2.add(b)
    out = s2.schedule()  # a takes 2 blocks; b needs 2, one is left: b waits (no preemption at admission)
    assert [x.seq for x in out.scheduled] == [a] and b.status is SequenceStatus.WAITING and not out.preempted


def test_the_waiting_queue_is_bounded():
    s = _sched(max_waiting=2)
    s.add(Sequence([1]))
    s.add(Sequence([2]))
    with pytest.raises(QueueFull, match="already wait"):
        s.add(Sequence([3]))


def test_a_sequence_the_pool_can_never_hold_is_refused():
    s = _sched(num_blocks=4)
    with pytest.raises(ValueError, match=r"needs 5 KV blocks .* holds 4"):
        s.add(Sequence(list(range(10)), max_tokens=10))


def test_out_of_blocks_preempts_the_latest_admitted_and_its_stream_continues_unchanged():
    # 4 blocks of 4: two sequences of 6 prompt + 6 output tokens (3 blocks each at the end) cannot both fit.
    s = _sched(num_blocks=4)
    a, b = Sequence(list(range(6)), max_tokens=6), Sequence(list(range(10, 16)), max_tokens=6)
    s.add(a)
    s.add(b)
    outs = _run(s)
    preempted = [q for o in outs for q in o.preempted]
    assert preempted and set(preempted) == {b} and s.num_preemptions == len(preempted)
    assert b.num_preemptions == len(preempted) and a.num_preemptions == 0
    for o in outs:  # a step that had to preempt admits nobody (not even the sequence it just preempted)
        assert not {x.seq for x in o.scheduled} & set(o.preempted)
    # Recomputed from prompt + tokens so far: the streams equal those of an unconstrained run.
    assert a.output_ids == [106 + i for i in range(6)] and b.output_ids == [106 + i for i in range(6)]
    ref = _sched(num_blocks=64)
    ra, rb = Sequence(list(range(6)), max_tokens=6), Sequence(list(range(10, 16)), max_tokens=6)
    ref.add(ra)
    ref.add(rb)
    _run(ref)
    assert (a.output_ids, b.output_ids) == (ra.output_ids, rb.output_ids)
    assert s.blocks.num_used_blocks == 0


def test_a_preempted_sequence_resumes_ahead_of_later_arrivals_and_recomputes_all_its_tokens():
    s = _sched(num_blocks=4, max_num_seqs=2)
    a, b, c = (Sequence(list(range(k, k + 6)), max_tokens=6) for k in (0, 10, 20))
    for q in (a, b, c):
        s.add(q)
    while not b.num_preemptions:
        _step(s)
    assert list(s.waiting)[:2] == [b, c] and b.status is SequenceStatus.PREEMPTED and b.block_table == []
    while b.status is not SequenceStatus.RUNNING:
        out = _step(s)
    recompute = next(x for x in out.scheduled if x.seq is b)
    assert recompute.start == 0 or recompute.start % BS == 0  # from scratch, or from its own cached blocks
    _run(s)
    assert [q.output_ids for q in (a, b, c)] == [[106 + i for i in range(6)]] * 3


def test_a_shared_prefix_is_not_recomputed():
    s = _sched()
    system = list(range(12))
    first = Sequence(system + [90, 91], max_tokens=2)
    s.add(first)
    _run(s)
    second = Sequence(system + [95], max_tokens=2)
    s.add(second)
    out = s.schedule()
    assert [(x.seq, x.start, x.num_tokens) for x in out.scheduled] == [(second, 12, 1)]
    assert second.num_cached_tokens == 12 and s.blocks.counters.hit_tokens == 12
    assert s.blocks.counters.queried_tokens == 14 + 13


def test_blocks_return_on_finish_cancel_and_failure():
    for end in ("finish", "cancel_running", "cancel_waiting", "fail_step"):
        s = _sched(num_blocks=8, max_num_seqs=1)
        a, b = Sequence(list(range(9)), max_tokens=4), Sequence([1, 2], max_tokens=4)
        s.add(a)
        s.add(b)
        out = s.schedule()
        assert s.blocks.num_used_blocks == 3
        if end == "finish":
            s.finish(a)
        elif end == "cancel_running":
            s.cancel(a)
        elif end == "cancel_waiting":
            s.cancel(b)
        else:
            assert s.fail_step(out) == [a] and a.status is SequenceStatus.FAILED
            assert s.blocks.num_cached_blocks == 0  # nothing of the failed step is published
        nxt = s.schedule()
        if end == "cancel_waiting":
            assert b in nxt.finished and b.status is SequenceStatus.FINISHED and not s.waiting
            s.finish(a)
        else:
            assert [x.seq for x in nxt.scheduled] == [b]  # a's slot and blocks went to b
            s.finish(b)
        assert s.blocks.num_used_blocks == 0, end
        assert not s.has_work


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="prefill_chunk is 0"):
        SchedulerConfig(prefill_chunk=0)
