"""The engine core process (serve/engine_core.py) through its client (serve/core_client.py): a real
child process over real pipes, no Ray. What Serve adds on top is tested in tests/integration
and tests/reliability; this module tests the process boundary itself: answers equal the
reference sampler's, one message per engine step, cancellation reaching the core, no core
outliving its parent, and start-up errors that name their cause."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import pid_alive, publish_tiny_models, wait_until
from modelfleet import registry
from modelfleet.data.tokenizer import ByteTokenizer
from modelfleet.errors import ArtifactError, ConfigError
from modelfleet.serve import core_messages as cm
from modelfleet.serve.core_client import CoreClient
from modelfleet.serve.generation import Job

PROBE = "def main("


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[str, str]:
    storage = tmp_path_factory.mktemp("core-storage")
    answers = publish_tiny_models(storage, (1,), probe=PROBE)
    return registry.resolve(str(storage), "tiny").uri, answers["v1"]


def _start(uri: str, **kw) -> cm.Start:
    base = dict(
        artifact_uri=uri,
        device="cpu",
        dtype="float32",
        num_threads=1,
        max_num_seqs=8,
        prefill_chunk=64,
        max_waiting=64,
        max_model_len=0,
        kv_cache_tokens=0,
        block_size=16,
        num_kv_blocks=0,
        prefix_caching=True,
        pool=False,
        name="tiny",
    )
    return cm.Start(**{**base, **kw})


class _Sink:
    """What a replica does with the core's messages, recorded."""

    def __init__(self) -> None:
        self.reports: list[cm.StepReport] = []
        self.refusals: list[cm.Refused] = []
        self.lock = threading.Lock()

    def deliver(self, r: cm.StepReport) -> None:
        with self.lock:
            self.reports.append(r)

    def refused(self, r: cm.Refused) -> None:
        self.refusals.append(r)

    def text(self, rid: int) -> str:
        return "".join(s.text for r in self.reports for s in r.seqs if s.rid == rid)

    def finished(self, rid: int) -> bool:
        return any(s.rid == rid and s.finish_reason for r in self.reports for s in r.seqs)


@pytest.fixture(scope="module")
def core(artifact):
    sink = _Sink()
    c = CoreClient(_start(artifact[0]), sink.deliver, sink.refused)
    yield c, sink
    c.stop()
    c.proc.wait(30)


def test_answers_equal_the_reference_and_each_step_is_one_message(core, artifact):
    c, sink = core
    tok = ByteTokenizer()
    before = len(sink.reports)
    rids = list(range(1, 7))
    for rid in rids:
        c.submit(rid, Job(tok.encode(PROBE), 8 if rid == 1 else 24, temperature=0.0))
    wait_until(lambda: all(sink.finished(r) for r in rids), 60, "six requests to finish in the core", 0.05)
    assert sink.text(1) == artifact[1]  # greedy through the process boundary == the reference sampler
    reports = sink.reports[before:]
    tokens = sum(s.tokens for r in reports for s in r.seqs)
    # One message per engine step carrying every sequence's tokens, not one per token.
    assert max(len(r.seqs) for r in reports) >= 4, [len(r.seqs) for r in reports]
    assert len(reports) < tokens / 3, (len(reports), tokens)
    firsts = [s for r in reports for s in r.seqs if s.ttft is not None]
    assert len(firsts) == 6 and all(s.ttft > 0 and s.prompt_tokens == len(PROBE) for s in firsts)
    assert c.in_flight == 0 and c.problem is None


def test_a_cancelled_request_leaves_the_core_at_once(core):
    c, sink = core
    c.submit(100, Job(ByteTokenizer().encode("x"), 120, temperature=1.0, seed=3))
    wait_until(lambda: any(s.rid == 100 for r in sink.reports for s in r.seqs), 30, "the request's first token", 0.02)
    t0 = time.monotonic()
    c.cancel(100)
    wait_until(lambda: sink.reports[-1].running == 0, 2, "the cancelled sequence to leave the batch", 0.01)
    print(f"\n[engine-core] cancelled sequence gone from the batch in {time.monotonic() - t0:.3f} s")
    assert not sink.finished(100) and c.in_flight == 0


def test_the_digest_carries_the_prefix_cache_keys_and_a_cancelled_wait_harms_nothing(core):
    """Digest: the core's published block keys (what the cache-aware router matches) after a
    prompt of 3 full blocks ran, and the engine's block size. A digest whose waiter gave up (the
    replica's 5 s bound: the future is cancelled) is answered later without ending the reader."""
    from modelfleet.serve.prefix_route import request_keys

    c, sink = core
    ids = ByteTokenizer().encode("k" * 49)
    c.submit(200, Job(ids, 2, temperature=0.0))
    wait_until(lambda: sink.finished(200), 30, "the prompt computed", 0.02)
    abandoned = c.digest()
    abandoned.cancel()
    d = c.digest().result(10)
    assert d.block_size == 16 and d.queued_prefill_tokens == 0
    assert set(request_keys(ids, d.base_sha, d.block_size, 8)) <= set(d.keys)
    assert c.digest().result(10).keys == d.keys  # the reader lives on after the cancelled answer


def test_core_exits_when_its_parent_is_killed(artifact, tmp_path):
    """SIGKILL of the process that owns a core (a replica killed alone): the core reads end-of-file
    on its pipe and exits, within 5 s."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from modelfleet.serve.core_client import CoreClient\n"
        "from modelfleet.serve import core_messages as cm\n"
        f"start = cm.Start({artifact[0]!r}, 'cpu', 'float32', 1, 8, 64, 64, 0, 0, 16, 0, True, False, 'tiny')\n"
        "c = CoreClient(start, lambda r: None, lambda r: None)\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        core_pid = int(owner.stdout.readline())
        assert Path(f"/proc/{core_pid}").exists()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        t0 = time.monotonic()
        wait_until(
            lambda: not pid_alive(core_pid), 5, f"engine core {core_pid} to exit after its owner's SIGKILL", 0.05
        )
        print(f"\n[engine-core] owner SIGKILLed: core {core_pid} gone in {time.monotonic() - t0:.2f} s")
    finally:
        owner.kill()


def test_start_up_errors_name_their_cause(artifact, tmp_path):
    with pytest.raises(ConfigError, match="max_model_len 4096 exceeds the model's context of 128 tokens"):
        CoreClient(_start(artifact[0], max_model_len=4096), lambda r: None, lambda r: None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"family": "gpt", "weights_sha256": "0"}')
    (bad / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="has no model.safetensors"):
        CoreClient(_start(str(bad)), lambda r: None, lambda r: None)
