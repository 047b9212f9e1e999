"""engine-ipc: what one engine step's output message costs between the engine core process and its
replica (issue 26's IPC figure), and why msgpack (msgspec) and not pickle.

A ``StepReport`` with N running sequences (one token each, a few characters of text), encoded,
sent over a real pipe to a second process that decodes it and answers one byte (so each sample is
serialise + send + receive + deserialise, plus the one-byte answer's way back); p50 and p99 of
many samples. The same message as pickled dataclasses beside it.

    python bench/engine_ipc.py [--seqs 16] [--n 20000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import time
from dataclasses import dataclass

from common import pct, save, table


@dataclass
class _PSeq:
    rid: int
    text: str
    tokens: int
    finish_reason: str | None
    produced: int
    cached: int
    prompt_tokens: int


@dataclass
class _PReport:
    seqs: list
    running: int
    waiting: int
    cache_use: float


def _echo(conn, kind: str) -> None:
    import msgspec

    from modelfleet.serve import core_messages as cm

    dec = msgspec.msgpack.Decoder(cm.FromCore)
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        dec.decode(data) if kind == "msgspec" else pickle.loads(data)
        conn.send_bytes(b"k")


def measure(kind: str, seqs: int, n: int) -> dict:
    import msgspec

    from modelfleet.serve import core_messages as cm

    if kind == "msgspec":
        enc = msgspec.msgpack.Encoder()
        msg = cm.StepReport(
            [cm.SeqStep(i, " the", 1, None, 17, 0, 40) for i in range(seqs)], seqs, 0, seqs, 0, 0.3, True, 0
        )

        def encode():
            return enc.encode(msg)
    else:
        pmsg = _PReport([_PSeq(i, " the", 1, None, 17, 0, 40) for i in range(seqs)], seqs, 0, 0.3)

        def encode():
            return pickle.dumps(pmsg, protocol=5)

    here, there = mp.get_context("spawn").Pipe()
    child = mp.get_context("spawn").Process(target=_echo, args=(there, kind), daemon=True)
    child.start()
    samples = []
    for i in range(n + 500):
        t = time.perf_counter()
        here.send_bytes(encode())
        here.recv_bytes()
        if i >= 500:  # the first ones warm the caches
            samples.append(time.perf_counter() - t)
    here.send_bytes(b"")
    child.join(10)
    return {
        "format": kind,
        "bytes": len(encode()),
        "p50_us": pct(samples, 50) * 1e6,
        "p99_us": pct(samples, 99) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--n", type=int, default=20000)
    a = ap.parse_args()
    rows = [measure(k, a.seqs, a.n) for k in ("msgspec", "pickle")]
    print(table(rows, ["format", "bytes", "p50_us", "p99_us"]))
    save(
        "engine_ipc",
        {
            "running_sequences": a.seqs,
            "samples": a.n,
            "rows": rows,
            "step_message_p50_us": rows[0]["p50_us"],
            "ratios": {"pickle_over_msgspec_p50": rows[1]["p50_us"] / rows[0]["p50_us"]},
        },
    )


if __name__ == "__main__":
    main()
