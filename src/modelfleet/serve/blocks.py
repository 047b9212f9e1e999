"""The KV block pool: fixed-size blocks, per-sequence block tables, automatic prefix caching.

Pure Python bookkeeping over block ids (the KV tensor itself belongs to the model runner), after
nano-vllm's ``BlockManager`` and vLLM v1's ``KVCacheManager`` / ``kv_cache_utils``:

- A **full** block (``block_size`` tokens whose KV a successful step computed) is *published*
  under a key from a sha256 hash chain: ``H(parent key, its token ids, base weights' sha256,
  adapter sha256 or none, cache salt or none)``, every field tagged and length-prefixed (domain
  separation, so no two field lists encode to the same bytes). sha256 and not Python's
  ``hash()``: collision-resistant, and the same key in every process (a router can recompute it).
- A new sequence whose leading blocks' keys are published takes those blocks (reference count +1,
  no copy) and skips their prefill. At most ``num_tokens - 1`` tokens come from the cache: the
  last token always runs, its logits give the first sampled token.
- A freed block keeps its key and waits in an LRU of free cached blocks; it is evicted (key
  dropped, block reused) only when no never-cached free block is left. A sequence frees its
  blocks tail first, so its tail is evicted before the prefix others are likelier to share.
- Blocks are published only by ``commit`` after a step succeeded: blocks filled by a failed step
  go back unpublished. ``flush`` (new weights) drops every key and starts a new epoch, so
  sequences still holding old-weight KV never publish it.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from modelfleet.serve.sequence import Sequence

_DOMAIN = b"modelfleet.kv-block.v1"


def _field(h: hashlib._Hash, tag: bytes, value: bytes | None) -> None:
    """One tagged field: tag, presence byte, 8-byte length, bytes (None differs from b"")."""
    h.update(tag)
    if value is None:
        h.update(b"\x00")
        return
    h.update(b"\x01" + struct.pack("<Q", len(value)))
    h.update(value)


def block_hash(
    parent: bytes | None,
    token_ids: Iterable[int],
    *,
    base_sha: str,
    adapter_sha: str | None = None,
    cache_salt: str | None = None,
) -> bytes:
    """The key of one full block: 32 bytes of sha256 over the domain tag and the tagged fields.
    ``parent`` is the previous block's key (None for a sequence's first block)."""
    ids = list(token_ids)
    h = hashlib.sha256(_DOMAIN)
    _field(h, b"P", parent)
    _field(h, b"T", struct.pack(f"<{len(ids)}q", *ids))
    _field(h, b"B", base_sha.encode())
    _field(h, b"A", None if adapter_sha is None else adapter_sha.encode())
    _field(h, b"S", None if cache_salt is None else cache_salt.encode())
    return h.digest()


@dataclass
class Block:
    id: int
    ref_count: int = 0
    key: bytes | None = None
    """Published hash-chain key, or None (never full, or not computed by a successful step)."""


@dataclass
class CacheCounters:
    """Prefix-cache totals since start (the replica exports them as Prometheus counters)."""

    queried_tokens: int = 0
    """Prompt tokens looked up at first admission."""
    hit_tokens: int = 0
    """Of those, tokens served from cached blocks."""
    evictions: int = 0
    """Cached blocks whose key was dropped to reuse the block."""
    flushes: int = 0


@dataclass
class BlockManager:
    """Block ids, reference counts and the prefix cache of one KV pool (see the module docstring)."""

    num_blocks: int
    block_size: int = 16
    base_sha: str = ""
    """sha256 of the base weights: in every key, so a replica with other weights never matches."""
    enable_prefix_caching: bool = True
    counters: CacheCounters = field(default_factory=CacheCounters)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks is {self.num_blocks}; the KV pool needs at least one block")
        if self.block_size < 1:
            raise ValueError(f"block_size is {self.block_size}; it must be at least 1 token")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free_plain: collections.deque[int] = collections.deque(range(self.num_blocks))
        """Free blocks without a key: handed out first (reusing them costs no cache hit)."""
        self._free_cached: collections.OrderedDict[int, None] = collections.OrderedDict()
        """Free blocks with a key, least recently freed first: the eviction order."""
        self._by_key: dict[bytes, int] = {}
        self.epoch = 0

    # ------------------------------------------------------------------ sizes
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Blocks in use / blocks (the KV gauge)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a published key, in use or free."""
        return len(self._by_key)

    def published_keys(self, nbytes: int = 8, limit: int = 1 << 15) -> list[bytes]:
        """The leading ``nbytes`` of the ``limit`` most recently published keys (what a
        cache-aware router matches against: 8 bytes make a false match between two live prefixes
        a 2^-64 event; the limit bounds a publication to 256 KiB however large the pool)."""
        keys = list(self._by_key)  # insertion order: publication order (evicted keys are deleted)
        return [k[:nbytes] for k in keys[-limit:]]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ hashing
    def _hashes(self, seq: Sequence, num_full: int) -> list[bytes]:
        """``seq``'s keys for its first ``num_full`` full blocks, computed once per epoch and kept on it."""
        if seq.hash_epoch != self.epoch:
            seq.block_hashes, seq.hash_epoch = [], self.epoch
        hashes, bs = seq.block_hashes, self.block_size
        if len(hashes) < num_full:
            ids = seq.token_ids
            for i in range(len(hashes), num_full):
                parent = hashes[i - 1] if i else None
                hashes.append(
                    block_hash(
                        parent,
                        ids[i * bs : (i + 1) * bs],
                        base_sha=self.base_sha,
                        adapter_sha=seq.adapter_sha,
                        cache_salt=seq.cache_salt,
                    )
                )
        return hashes[:num_full]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Published blocks matching ``seq``'s leading full blocks, at most ``num_tokens - 1``
        tokens' worth (no side effects; ``allocate`` takes them)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for key in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            bid = self._by_key.get(key)
            if bid is None:
                break
            found.append(bid)
        return found

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        cached = cached or []
        have = len(seq.block_table) + len(cached)
        computed = max(seq.num_computed_tokens, len(cached) * self.block_size)
        need = max(0, self.blocks_for(computed + num_new_tokens) - have)
        # A cached hit waiting in the free LRU is counted free but is about to be taken, not reused.
        reclaimed = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return need <= self.num_free_blocks - reclaimed

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens; a sequence without blocks first
        takes ``cached`` (from ``match_prefix``) as its computed prefix. All or nothing: False, and
        no change, when the pool cannot hold them (the scheduler then preempts or waits)."""
        cached = cached or []
        if cached and seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks; only a new one takes a cached prefix")
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        if not seq.block_table:
            first = seq.num_cached_tokens < 0
            for bid in cached:
                self._take(bid)
            seq.block_table = list(cached)
            seq.num_computed_tokens = len(cached) * self.block_size
            seq.kv_epoch = self.epoch
            if first:  # re-admission after a preemption is a recompute, not a new query
                seq.num_cached_tokens = seq.num_computed_tokens
                self.counters.queried_tokens += seq.num_prompt_tokens
                self.counters.hit_tokens += seq.num_computed_tokens
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take(self._pop_free()))
        return True

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """A step computed ``num_computed`` more tokens of ``seq`` successfully: advance it and
        publish the blocks that became full (unless weights changed since it was admitted)."""
        before = seq.num_computed_tokens // self.block_size
        seq.num_computed_tokens += num_computed
        if seq.num_computed_tokens > len(seq.block_table) * self.block_size:
            raise ValueError(
                f"sequence {seq.seq_id} computed {seq.num_computed_tokens} tokens but holds "
                f"{len(seq.block_table)} blocks of {self.block_size}"
            )
        if not self.enable_prefix_caching or seq.kv_epoch != self.epoch:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= before:
            return
        for i, key in enumerate(self._hashes(seq, full)[before:], start=before):
            block = self.blocks[seq.block_table[i]]
            if block.key is None and key not in self._by_key:  # the first publisher keeps the key
                block.key = key
                self._by_key[key] = block.id

    def free(self, seq: Sequence) -> None:
        """Return ``seq``'s blocks (finish, cancel, failure, preemption), tail first."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is not None:
                    self._free_cached[bid] = None
                else:
                    self._free_plain.append(bid)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def flush(self, base_sha: str | None = None) -> None:
        """New weights: drop every published key (in-use blocks keep their KV until freed, but
        are never matched again) and, when given, switch to the new weights' ``base_sha``."""
        for block in self.blocks:
            block.key = None
        self._by_key.clear()
        self._free_plain.extend(self._free_cached)
        self._free_cached.clear()
        self.epoch += 1
        self.counters.flushes += 1
        if base_sha is not None:
            self.base_sha = base_sha

    # ------------------------------------------------------------------ internals
    def _pop_free(self) -> int:
        if self._free_plain:
            return self._free_plain.popleft()
        bid, _ = self._free_cached.popitem(last=False)  # least recently freed cached block
        block = self.blocks[bid]
        del self._by_key[block.key]
        block.key = None
        self.counters.evictions += 1
        return bid

    def _take(self, bid: int) -> int:
        block = self.blocks[bid]
        if block.ref_count == 0:
            self._free_cached.pop(bid, None)  # a cached hit leaves the LRU while in use
        block.ref_count += 1
        return bid
