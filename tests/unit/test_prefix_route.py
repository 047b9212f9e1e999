"""The cache-aware routing policy (serve/prefix_route.py): each pathology other routers' users
found is a case here, over views built with the engine's own hash chain."""

from __future__ import annotations

import random
from collections import Counter

from modelfleet.serve.blocks import BlockManager
from modelfleet.serve.prefix_route import PrefixRouter, ReplicaView, RouteKey, RouterPolicy, request_keys
from modelfleet.serve.sequence import Sequence

BS, SHA = 16, "w" * 64


def view(keys=(), queued=0, decode=0, rate=1000.0, at=1.0) -> ReplicaView:
    return ReplicaView(frozenset(keys), SHA, BS, queued, decode, rate, at)


def prompt(customer: int, n: int = 200, tail: int = 0) -> list[int]:
    return [1000 * customer + i for i in range(n)] + [7] * tail


def warm(tokens: list[int]) -> set[bytes]:
    return set(request_keys(tokens, SHA, BS, 8))


def router(**kw) -> PrefixRouter:
    return PrefixRouter(RouterPolicy(**kw), rng=random.Random(0))


def test_keys_are_the_engines_own():
    """The router's keys for a prompt are the keys the block manager publishes after computing it."""
    bm = BlockManager(num_blocks=32, block_size=BS, base_sha=SHA)
    tokens = prompt(1, 100)
    seq = Sequence(tokens, max_tokens=4)
    assert bm.allocate(seq, len(tokens))
    bm.commit(seq, len(tokens))
    published = set(bm.published_keys(8))
    mine = request_keys(tokens, SHA, BS, 8)
    assert len(mine) == (len(tokens) - 1) // BS and set(mine) <= published
    assert not set(request_keys(tokens, "other-weights", BS, 8)) & published


def test_a_salted_request_is_keyed_in_its_salts_space_as_the_engine_keys_it():
    """``cache_salt``: the router's keys of a salted prompt are the block manager's keys of the
    same salted sequence, and a replica warm with the prompt under another salt (or none) is not
    warm for it."""
    bm = BlockManager(num_blocks=32, block_size=BS, base_sha=SHA)
    tokens = prompt(1, 100)
    seq = Sequence(tokens, max_tokens=4, cache_salt="tenant-a")
    assert bm.allocate(seq, len(tokens))
    bm.commit(seq, len(tokens))
    published = set(bm.published_keys(8))
    assert set(request_keys(tokens, SHA, BS, 8, "tenant-a")) <= published
    assert not set(request_keys(tokens, SHA, BS, 8)) & published
    assert not set(request_keys(tokens, SHA, BS, 8, "tenant-b")) & published

    views = {"a": view(published), "b": view()}
    salted, other, plain = (
        RouteKey(tokens, cache_salt="tenant-a"),
        RouteKey(tokens, cache_salt="tenant-b"),
        RouteKey(tokens),
    )
    assert router().choose(views, salted)[0] == "a" and salted.decision.reason == "prefix"
    for key in (other, plain):
        router().choose(views, key)
        assert key.decision.reason == "load" and key.decision.cached_tokens == 0


def test_warm_replica_wins_and_the_follow_up_sticks():
    r = router()
    p = prompt(1, tail=10)
    views = {"a": view(), "b": view(warm(prompt(1))), "c": view()}
    key = RouteKey(p)
    assert r.choose(views, key)[0] == "b"
    assert key.decision.reason == "prefix" and key.decision.cached_tokens == (200 // BS) * BS


def test_ties_spread_a_cold_burst():
    """Equal scores (llm-d-router#2515): 12 cold, distinct requests on 4 idle replicas spread."""
    r = router()
    views = {x: view() for x in "abcd"}
    firsts = Counter(r.choose(views, RouteKey(prompt(c, 100)))[0] for c in range(12))
    assert len(firsts) == 4 and max(firsts.values()) <= 4, firsts


def test_requests_without_a_prompt_spread_by_load():
    """A body the ingress router cannot read is keyed with no tokens: picked by load, not all
    on the first candidate (what Serve's pick-only mode does with an unranked list)."""
    r = router()
    views = {x: view() for x in "abcd"}
    firsts = Counter(r.choose(views, RouteKey([], None, 16))[0] for _ in range(8))
    assert sorted(firsts.values()) == [2, 2, 2, 2], firsts
    assert r.choose(views, key := RouteKey([])) and key.decision.cached_tokens == 0


def test_a_burst_of_one_new_prefix_follows_the_first_send():
    """Before any replica publishes it, the prefix this router just sent stays where it went."""
    r = router()
    views = {x: view() for x in "abcd"}
    picks = {r.choose(views, RouteKey(prompt(5, tail=i)))[0] for i in range(4)}
    assert len(picks) == 1


def test_one_saturated_replica_does_not_switch_affinity_off_for_others():
    """No fleet-wide imbalance gate (vllm-project/router#238): replica a is saturated, so its own
    customer spills, while customer 2 still goes to its warm replica b despite the imbalance."""
    r = router(ttft_ceiling_s=1.0)
    views = {
        "a": view(warm(prompt(1)), queued=5000, rate=1000.0),
        "b": view(warm(prompt(2)), queued=300, rate=1000.0),
        "c": view(queued=0),
    }
    k1, k2 = RouteKey(prompt(1, tail=5)), RouteKey(prompt(2, tail=5))
    assert r.choose(views, k1)[0] == "c" and k1.decision.reason == "spill"
    assert r.choose(views, k2)[0] == "b" and k2.decision.reason == "prefix"


def test_token_load_not_request_count():
    """llm-d-router#1977: a replica with a few long uncached prefills is not chosen over one with
    many short decodes (3 x 700 prefill tokens against 16 sequences with 10 tokens left)."""
    r = router()
    views = {"long": view(queued=2100, decode=0), "short": view(queued=0, decode=160)}
    assert r.choose(views, RouteKey(prompt(9, 50)))[0] == "short"


def test_spill_uses_published_load_not_this_routers_counts():
    """Two router replicas: the second has sent nothing itself, yet spills off the replica whose
    publication shows the first router's sends queued there."""
    first, second = router(), router()
    views = {"a": view(warm(prompt(1)), queued=0), "b": view()}
    assert first.choose(views, RouteKey(prompt(1, tail=3)))[0] == "a"
    published = {"a": view(warm(prompt(1)), queued=4000, at=2.0), "b": view(at=2.0)}
    key = RouteKey(prompt(1, tail=4))
    assert second.choose(published, key)[0] == "b" and key.decision.reason == "spill"


def test_an_evicted_prefix_and_a_dead_replica_leave_the_view():
    r = router()
    p = prompt(3, tail=2)
    assert r.choose({"a": view(warm(prompt(3))), "b": view()}, RouteKey(p))[0] == "a"
    # a's next publication no longer holds the prefix, and b is the lighter one now
    key = RouteKey(prompt(3, tail=3))
    r.choose({"a": view(queued=500, at=2.0), "b": view(at=2.0)}, key)
    assert key.decision.reason == "load" and key.decision.replica == "b"
    r.forget({"b"})
    assert r.choose({"b": view(at=3.0)}, RouteKey(p)) == ["b"]


def test_a_session_sticks_when_no_prefix_is_warm():
    r = router()
    views = {x: view() for x in "abcd"}
    first = r.choose(views, RouteKey(prompt(11, 8), "s-1"))[0]
    for i in range(5):
        key = RouteKey(prompt(20 + i, 8), "s-1")
        assert r.choose(views, key)[0] == first and key.decision.reason == "session"


def test_the_router_reads_prompts_as_the_replica_does_and_never_fails_on_a_body():
    """prompt_of parses with the replica's OpenAI schemas; any body it cannot use (not JSON,
    nested past the parser's limit, truncated by HAProxy's buffer, another schema) is None:
    routed by load, never an error (HAProxy would turn it into a 503)."""
    import json

    from modelfleet.serve import openai as oa
    from modelfleet.serve.route_front import RoutedPrompt, prompt_of

    chat = {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    text = oa.ChatCompletionRequest.model_validate(chat).prompt()
    assert prompt_of(json.dumps(chat).encode()) == RoutedPrompt(text, "m", None, None)
    assert prompt_of(b'{"prompt": "def main(", "max_tokens": 7}') == RoutedPrompt("def main(", None, 7, None)
    salted = b'{"prompt": "x", "cache_salt": "tenant-a"}'
    assert prompt_of(salted) == RoutedPrompt("x", None, None, "tenant-a")
    for body in (
        b"",
        b"\xff\xfe",
        b'{"prompt": "x", "max_tokens": ',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": "x", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": 5}',
        b'{"messages": "hi"}',
        b'{"instances": [[1, 2]]}',
        b"null",
    ):
        assert prompt_of(body) is None, body[:40]


def test_work_sent_to_a_silent_replica_counts_its_decode():
    """Requests sent to a replica that never publishes again (frozen) weigh their prompt and
    max_tokens: a frozen replica stops looking lighter than one serving as many requests."""
    r = router()
    views = {"frozen": view(at=1.0), "busy": view(decode=3 * 40, at=1.0)}
    picks = [r.choose(views, RouteKey(prompt(30 + i, 9), max_tokens=40))[0] for i in range(6)]
    assert picks.count("frozen") <= 4, picks


def test_a_replica_that_stops_publishing_is_ranked_last():
    """A frozen replica's last view keeps it looking idle while what it is sent never finishes: once
    its publication has not changed for stale_after_s it goes last, even holding the prefix; when
    it publishes again it is back. With every replica silent, the ranking is the usual one."""
    now = [0.0]
    r = PrefixRouter(RouterPolicy(stale_after_s=2.0), rng=random.Random(0), clock=lambda: now[0])
    frozen = view(warm(prompt(1)), at=1.0)
    assert r.choose({"a": frozen, "b": view(queued=500, at=1.0)}, RouteKey(prompt(1, tail=1)))[0] == "a"
    for t in (1.0, 2.5):
        now[0] = t
        order = r.choose({"a": frozen, "b": view(queued=500, at=10 + t)}, RouteKey(prompt(1, tail=2)))
    assert order == ["b", "a"]
    now[0] = 3.0
    assert r.choose({"a": view(warm(prompt(1)), at=3.0), "b": view(at=13.0)}, RouteKey(prompt(1, tail=3)))[0] == "a"
    now[0] = 9.0
    assert r.choose({"a": view(warm(prompt(1)), at=3.0), "b": view(at=13.0)}, RouteKey(prompt(1, tail=4)))[0] == "a"
