"""The engine core process: one per LM replica, holding the model, the KV pool, the scheduler and
the step loop, so that decoding never waits on Serve's event loop for the GIL (and the reverse).

Started by ``CoreClient`` (``serve/core_client.py``) as ``python -m modelfleet.serve.engine_core``:
a fresh interpreter (``fork`` of a Ray worker would copy its gRPC threads' state mid-flight). The
replica's pipes are its channel: messages (``serve/core_messages.py``) arrive on stdin, and go
back on a duplicate of stdout, whose own descriptor is pointed at stderr (the replica's log) so a
stray ``print`` cannot corrupt the stream. End-of-file on stdin means the replica is gone (exited,
killed, or its node's raylet took it down): the core exits at once, so no core outlives its
replica.

Tokenizing stays in the replica: it validates the prompt against the context before anything is
queued, and answers a 400 without a round trip. Detokenizing and stop strings run here, beside
sampling, where the step's tokens are.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import torch

from modelfleet.errors import ConfigError
from modelfleet.families import get_family
from modelfleet.families.artifact import load_artifact
from modelfleet.models import lora
from modelfleet.models.placement import Placement, place
from modelfleet.serve import core_messages as cm
from modelfleet.serve.engine import EngineConfig, EngineLoop, new_engine
from modelfleet.serve.engine_types import EngineFull
from modelfleet.serve.generation import Job
from modelfleet.serve.pool import AdapterPool

logger = logging.getLogger("modelfleet.engine_core")


class _Core:
    """The core's state: the engine and its loop (built on ``Start``), and the request table."""

    def __init__(self, out: Connection) -> None:
        self.out = out
        self.enc = msgspec.msgpack.Encoder()
        self.send_lock = threading.Lock()  # the step thread and the reader both send
        self.loop: Any = None
        self.pool: Any = None
        self.requests: dict[int, Any] = {}  # rid -> the engine's sequence
        self.rids: dict[int, int] = {}  # id(job) -> rid, set before the job is queued

    def send(self, msg: cm.FromCore) -> None:
        data = self.enc.encode(msg)
        with self.send_lock:
            self.out.send_bytes(data)

    # ------------------------------------------------------------------ start
    def start(self, m: cm.Start) -> None:
        torch.set_num_threads(max(1, m.num_threads))
        model, tokenizer, manifest = load_artifact(m.artifact_uri)
        placement = Placement(torch.device(m.device), getattr(torch, m.dtype))
        model = place(model, placement)
        if m.pool:
            lora.peft()  # imported now (seconds), not inside the first variant's cold load
            self.pool = AdapterPool(model, get_family(manifest["family"]), next(model.parameters()).device)
        engine = new_engine(
            model,
            eos_id=tokenizer.eos_id,
            decode=tokenizer.decode,
            config=EngineConfig(
                max_num_seqs=m.max_num_seqs,
                prefill_chunk=m.prefill_chunk,
                max_waiting=m.max_waiting,
                max_len=context_limit(m.name, m.max_model_len, m.kv_cache_tokens, int(model.cfg.block_size)),
                block_size=m.block_size,
                num_kv_blocks=m.num_kv_blocks,
                enable_prefix_caching=m.prefix_caching,
            ),
            adapters=self.pool,
            base_sha=str(manifest.get("weights_sha256", "")),
        )
        summary = (
            f"paged ({engine.blocks.num_blocks} blocks of {engine.blocks.block_size} tokens, prefix caching "
            f"{'on' if engine.blocks.enable_prefix_caching else 'off'})"
            if hasattr(engine, "blocks")
            else "slots (one forward per row: this model has no paged forward)"
        )
        summary += f", {m.max_num_seqs} sequences of up to {engine.max_len} tokens, KV cache "
        summary += f"{engine.cache.nbytes / 2**20:.1f} MiB, prefill chunk {m.prefill_chunk}"
        self.loop = EngineLoop(engine, self._deliver, name=f"engine-{m.name}")
        self.send(cm.Started(os.getpid(), engine.max_len, summary))

    # ------------------------------------------------------------------ requests
    def submit(self, m: cm.Submit) -> None:
        job = Job(m.prompt_ids, m.max_tokens, m.temperature, m.top_p, m.seed, list(m.stop), m.adapter, m.cache_salt)
        self.rids[id(job)] = m.rid  # before the step thread can see it
        try:
            if m.adapter is None:
                seq = self.loop.submit(job)
            else:
                # On the step thread, between steps: the adapter is (re)loaded if an eviction
                # dropped it, and the job queued in the same call, so no eviction falls between.
                def admit() -> Any:
                    self.pool.load(m.adapter, m.adapter_dir)
                    return self.loop.engine.add(job)

                seq = self.loop.call(admit).result()
        except EngineFull as e:
            self.rids.pop(id(job), None)
            self.send(cm.Refused(m.rid, f"{e}", True))
            return
        except Exception as e:  # noqa: BLE001 - this request alone is refused
            self.rids.pop(id(job), None)
            self.send(cm.Refused(m.rid, f"{e!r}", False))
            return
        if id(job) in self.rids:  # not finished already (a one-token answer can end before this line)
            self.requests[m.rid] = seq

    def cancel(self, m: cm.Cancel) -> None:
        seq = self.requests.pop(m.rid, None)
        if seq is not None:
            # A cancelled sequence leaves without a last output: forget it here, or the tables grow.
            self.rids.pop(id(seq.job), None)
            self.loop.cancel(seq)  # its blocks free on the next step

    def load_adapter(self, m: cm.LoadAdapter) -> None:
        def load() -> None:
            self.pool.load(m.key, m.local_dir)

        fut = self.loop.call(load)
        fut.add_done_callback(lambda f: self.send(self._done(m.cid, f.exception())))

    def retain(self, m: cm.Retain) -> None:
        keep = set(m.keys)
        self._evict(lambda: [k for k in self.pool.loaded if k not in keep])

    def evict(self, m: cm.Evict) -> None:
        self._evict(lambda: list(m.keys))

    def _evict(self, keys: Any) -> None:
        def evict() -> None:  # on the step thread: the pool's modules change between steps only
            for key in keys():
                self.pool.evict(key)

        self.loop.call(evict)

    def digest(self, m: cm.Digest) -> None:
        """The routing stats: read on the step thread, between steps (the block tables change there)."""
        engine = self.loop.engine
        if not hasattr(engine, "routing_view"):  # the slot engine has no paged prefix cache
            self.send(cm.CacheDigest(m.cid, [], "", 0, 0, 0, 0.0))
            return

        def view() -> cm.CacheDigest:
            keys, queued, decode = engine.routing_view(cm.KEY_BYTES)
            b = engine.blocks
            return cm.CacheDigest(m.cid, keys, b.base_sha, b.block_size, queued, decode, engine.prefill_tokens_per_s)

        self.loop.call(view).add_done_callback(
            lambda f: self.send(f.result() if f.exception() is None else cm.CacheDigest(m.cid, [], "", 0, 0, 0, 0.0))
        )

    def _done(self, cid: int, error: BaseException | None) -> cm.Done:
        stats = self.pool.stats() if self.pool is not None else {}
        return cm.Done(
            cid,
            None if error is None else repr(error),
            adapters_loaded=stats.get("adapters_loaded", 0),
            tensor_bytes=stats.get("tensor_bytes", 0),
        )

    # ------------------------------------------------------------------ the step thread
    def _deliver(self, result: Any, loop: Any) -> None:
        """One message per step: every sequence's output, then the engine's state."""
        now, seqs = time.perf_counter(), []
        for seq, step in result.outputs:
            rid = self.rids.get(id(seq.job))
            if rid is None:
                continue
            ttft = tpot = None
            if seq.emitted == 1 and seq.first_token_at is not None:
                ttft = seq.first_token_at - seq.arrived
            if step.finish_reason and seq.produced > 1 and seq.first_token_at is not None:
                tpot = (now - seq.first_token_at) / (seq.produced - 1)
            seqs.append(
                cm.SeqStep(
                    rid,
                    step.text,
                    step.tokens,
                    step.finish_reason,
                    seq.produced,
                    max(getattr(seq, "num_cached_tokens", 0), 0),
                    len(seq.job.prompt_ids),
                    ttft,
                    tpot,
                    seq.error if step.finish_reason == "error" else None,
                )
            )
            if step.finish_reason:
                self.rids.pop(id(seq.job), None)
                self.requests.pop(rid, None)
        engine = loop.engine
        stats = self.pool.stats() if self.pool is not None else {}
        self.send(
            cm.StepReport(
                seqs,
                result.running,
                result.waiting,
                result.decoded,
                result.preempted,
                engine.cache_use,
                bool(getattr(engine, "healthy", True)),
                int(getattr(engine, "failed_steps_in_a_row", 0)),
                stats.get("adapters_loaded", 0),
                stats.get("tensor_bytes", 0),
                None if loop.error is None else repr(loop.error),
            )
        )


def context_limit(name: str, want: int, pool_tokens: int, context: int) -> int:
    """Most tokens per request: ``max_model_len`` (``want``; 0 = the model's context), checked
    against the model's context and the KV pool."""
    if want > context:
        raise ConfigError(f"serve model {name!r}: max_model_len {want} exceeds the model's context of {context} tokens")
    if pool_tokens and pool_tokens < (want or context):
        if want:
            raise ConfigError(
                f"serve model {name!r}: max_model_len {want} exceeds batching.kv_cache_tokens "
                f"({pool_tokens}): one request could never fit the KV pool"
            )
        want = pool_tokens  # a pool smaller than the context caps what one request may use
    return want or context


def _channel() -> tuple[Connection, Connection]:
    """stdin for messages in; a duplicate of stdout for messages out, stdout itself now stderr."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Connection(os.dup(0), writable=False), Connection(out_fd, readable=False)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="engine core %(process)d: %(message)s", stream=sys.stderr)
    inbox, out = _channel()
    core = _Core(out)
    dec = msgspec.msgpack.Decoder(cm.ToCore)
    handlers = {
        cm.Submit: core.submit,
        cm.Cancel: core.cancel,
        cm.LoadAdapter: core.load_adapter,
        cm.Retain: core.retain,
        cm.Evict: core.evict,
        cm.Digest: core.digest,
    }
    try:
        try:
            core.start(dec.decode(inbox.recv_bytes()))  # type: ignore[arg-type]
        except EOFError:
            raise
        except BaseException as e:  # the replica raises it from its reconfigure, with the cause
            logger.exception("engine core could not start")
            core.send(cm.Done(-1, str(e), type(e).__name__))
            os._exit(1)
        while True:
            msg = dec.decode(inbox.recv_bytes())
            if isinstance(msg, cm.Shutdown):
                core.loop.stop()
                core.loop.join()
                return
            handlers[type(msg)](msg)  # type: ignore[operator]
    except EOFError:
        # The replica is gone: nobody can read what the engine would produce.
        os._exit(0)
    except BaseException:
        logger.exception("engine core failed")
        os._exit(1)


if __name__ == "__main__":
    main()
