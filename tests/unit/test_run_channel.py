"""The run's channel (train/channel.py) as the driver and rank 0 use it, without Ray: records come
out in order and never block the sender, a full channel drops instead of waiting, the first stop
reason is kept. Its use through Ray is every training test (progress) and the stop-signal test."""

from __future__ import annotations

import asyncio
import time

from modelfleet.train.channel import RunChannel


def test_records_come_out_in_order_and_a_take_waits_only_for_the_first():
    async def go():
        ch = RunChannel()
        assert await ch.take(0.0) == []  # nothing waiting, no wait asked for
        t0 = time.monotonic()
        assert await ch.take(0.2) == []  # waited its timeout for a first record
        waited = time.monotonic() - t0
        for i in range(3):
            assert await ch.put({"kind": "step", "step": i})
        got = await ch.take(5.0)
        late = asyncio.create_task(ch.take(5.0))  # waiting when the next record arrives
        await asyncio.sleep(0)
        await ch.put({"kind": "eval", "step": 3})
        return waited, got, await asyncio.wait_for(late, 5.0)

    waited, got, late = asyncio.run(go())
    assert waited >= 0.19
    assert [r["step"] for r in got] == [0, 1, 2]
    assert late == [{"kind": "eval", "step": 3}]


def test_a_full_channel_drops_new_records_instead_of_blocking_the_sender():
    async def go():
        ch = RunChannel(max_items=2)
        sent = [await ch.put({"step": i}) for i in range(4)]
        return sent, await ch.take()

    sent, got = asyncio.run(go())
    assert sent == [True, True, False, False] and [r["step"] for r in got] == [0, 1]


def test_the_first_stop_reason_is_kept():
    async def go():
        ch = RunChannel()
        before = await ch.get()
        await ch.set("SIGTERM to the driver")
        await ch.set("SIGINT to the driver")
        return before, await ch.get()

    assert asyncio.run(go()) == ("", "SIGTERM to the driver")
