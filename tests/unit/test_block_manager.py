"""The KV block pool and prefix cache (serve/blocks.py), without a model."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from modelfleet.serve.blocks import BlockManager, block_hash
from modelfleet.serve.sequence import Sequence

BS = 4


def _computed(bm: BlockManager, seq: Sequence, n: int | None = None) -> Sequence:
    """Admit ``seq`` (taking its cached prefix) and compute ``n`` more tokens (default: the rest
    of its prompt but the last), as one successful step would."""
    cached = bm.match_prefix(seq)
    todo = (seq.num_tokens - len(cached) * BS) if n is None else n
    assert bm.allocate(seq, todo, cached)
    bm.commit(seq, todo)
    return seq


def test_hash_chain_is_sha256_over_tagged_fields_and_the_same_in_another_process():
    key = block_hash(None, [1, 2, 3, 4], base_sha="b" * 64)
    assert len(key) == 32 and key != hashlib.sha256(b"").digest()
    # Every field changes the key; None differs from an empty string (presence byte).
    others = [
        block_hash(key, [1, 2, 3, 4], base_sha="b" * 64),
        block_hash(None, [1, 2, 3, 5], base_sha="b" * 64),
        block_hash(None, [1, 2, 3, 4], base_sha="c" * 64),
        block_hash(None, [1, 2, 3, 4], base_sha="b" * 64, adapter_sha="a" * 64),
        block_hash(None, [1, 2, 3, 4], base_sha="b" * 64, adapter_sha=""),
        block_hash(None, [1, 2, 3, 4], base_sha="b" * 64, cache_salt="tenant-1"),
        block_hash(None, [1, 2, 3, 4], base_sha="b" * 64, cache_salt=""),
    ]
    assert len({key, *others}) == len(others) + 1
    # Length prefixes: moving bytes between fields cannot give the same key.
    assert block_hash(None, [1], base_sha="ab", adapter_sha="c") != block_hash(
        None, [1], base_sha="a", adapter_sha="bc"
    )
    # Deterministic across processes (no Python hash(), whose seed differs per process).
    code = (
        "from modelfleet.serve.blocks import block_hash; print(block_hash(None, [1, 2, 3, 4], base_sha='b' * 64).hex())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}
    )
    assert other.stdout.strip() == key.hex()


def test_blocks_grow_with_the_sequence_and_return_on_free():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = Sequence(list(range(6)), max_tokens=8)
    assert bm.allocate(seq, 6)
    assert len(seq.block_table) == 2 and bm.num_used_blocks == 2 and bm.usage == 2 / 8
    bm.commit(seq, 6)
    for t in range(3):  # decode: tokens 7, 8 fit the second block, token 9 opens a third
        seq.append_token(100 + t)
        assert bm.allocate(seq, 1)
        bm.commit(seq, 1)
    assert len(seq.block_table) == 3 and seq.num_computed_tokens == 9
    bm.free(seq)
    assert bm.num_used_blocks == 0 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = Sequence(list(range(12)), max_tokens=1)
    assert not bm.allocate(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_a_repeated_prompt_shares_its_full_blocks_and_counts_hits():
    bm = BlockManager(num_blocks=16, block_size=BS, base_sha="w")
    prompt = list(range(10))  # two full blocks + 2 tokens
    a = _computed(bm, Sequence(prompt))
    b = Sequence(prompt)
    cached = bm.match_prefix(b)
    assert cached == a.block_table[:2]
    assert bm.allocate(b, b.num_tokens - 2 * BS, cached)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert bm.counters.queried_tokens == 20 and bm.counters.hit_tokens == 8
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]


def test_the_last_token_always_runs():
    """A block-aligned prompt that is fully cached still computes its last block (its last token's
    logits give the first sampled token)."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    _computed(bm, Sequence(list(range(8))))
    again = Sequence(list(range(8)))
    assert len(bm.match_prefix(again)) == 1


def test_adapter_salt_and_base_weights_keep_caches_apart():
    prompt = list(range(9))
    for kw in ({"adapter_sha": "a1"}, {"cache_salt": "tenant-2"}):
        bm = BlockManager(num_blocks=16, block_size=BS)
        _computed(bm, Sequence(prompt))
        assert bm.match_prefix(Sequence(prompt, **kw)) == []
        assert len(bm.match_prefix(Sequence(prompt))) == 2
    bm = BlockManager(num_blocks=16, block_size=BS, base_sha="old")
    _computed(bm, Sequence(prompt))
    other = BlockManager(num_blocks=16, block_size=BS, base_sha="new")
    other._by_key = dict(bm._by_key)  # same published keys, other weights: no match
    assert other.match_prefix(Sequence(prompt)) == []


def test_only_committed_blocks_are_published():
    """A failed step's blocks go back without a key: nothing it half-wrote is ever matched."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    seq = Sequence(list(range(9)))
    assert bm.allocate(seq, 9)  # the step fails: no commit
    bm.free(seq)
    assert bm.num_cached_blocks == 0 and bm.match_prefix(Sequence(list(range(9)))) == []
    _computed(bm, Sequence(list(range(9))), 5)  # one full block computed of two
    assert bm.num_cached_blocks == 1


def test_freed_blocks_stay_cached_and_are_evicted_lru_tail_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = _computed(bm, Sequence(list(range(9))))  # 3 blocks: 2 full (published) + 1 partial
    bm.free(a)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2
    b = Sequence([50, 51])  # takes never-cached blocks first: the cache survives
    assert bm.allocate(b, 2) and bm.num_cached_blocks == 2
    c = Sequence(list(range(60, 68)))  # needs 2 blocks: the plain one left, then one eviction
    assert bm.allocate(c, 8)
    assert bm.counters.evictions == 1 and bm.num_cached_blocks == 1
    # a freed its tail first, so its second block went; its first block (the shared prefix) stays.
    assert len(bm.match_prefix(Sequence(list(range(9))))) == 1


def test_a_hit_block_leaves_the_lru_while_in_use():
    bm = BlockManager(num_blocks=3, block_size=BS)
    bm.free(_computed(bm, Sequence(list(range(5)))))  # block 0 cached and free
    again = Sequence(list(range(5)))
    cached = bm.match_prefix(again)
    assert bm.allocate(again, 1, cached)
    assert bm.blocks[cached[0]].ref_count == 1
    assert len(again.block_table) == 2  # the hit block + one for its last token
    big = Sequence(list(range(100, 104)))
    assert bm.allocate(big, 4)  # takes the last free block; the hit block is not evicted under again
    assert again.block_table[0] == cached[0] and bm.blocks[cached[0]].key is not None
    assert not bm.allocate(Sequence([7]), 1)


def test_can_allocate_counts_a_free_cached_hit_as_taken():
    bm = BlockManager(num_blocks=2, block_size=BS)
    bm.free(_computed(bm, Sequence(list(range(5)))))
    seq = Sequence(list(range(5)) + list(range(200, 204)))  # 1 hit block + 2 new blocks: pool of 2
    cached = bm.match_prefix(seq)
    assert len(cached) == 1
    assert not bm.can_allocate(seq, seq.num_tokens - BS, cached)
    assert not bm.allocate(seq, seq.num_tokens - BS, cached)
    assert bm.blocks[cached[0]].ref_count == 0 and seq.block_table == []


def test_flush_on_new_weights_drops_every_key_and_old_kv_is_never_published():
    bm = BlockManager(num_blocks=16, block_size=BS, base_sha="w1")
    bm.free(_computed(bm, Sequence(list(range(9)))))
    running = Sequence(list(range(30, 35)))
    assert bm.allocate(running, 5)
    bm.flush("w2")
    assert bm.num_cached_blocks == 0 and bm.base_sha == "w2"
    assert bm.match_prefix(Sequence(list(range(9)))) == []
    bm.commit(running, 5)  # computed with the old weights: its full block stays unpublished
    assert bm.num_cached_blocks == 0
    _computed(bm, Sequence(list(range(9))))
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 16 - 2 - 3


def test_caching_off_matches_nothing_and_publishes_nothing():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    bm.free(_computed(bm, Sequence(list(range(9)))))
    assert bm.num_cached_blocks == 0 and bm.match_prefix(Sequence(list(range(9)))) == []


@pytest.mark.parametrize("kw", [{"num_blocks": 0}, {"num_blocks": 4, "block_size": 0}])
def test_bad_sizes_are_refused(kw):
    with pytest.raises(ValueError, match="num_blocks|block_size"):
        BlockManager(**kw)
