"""A pool's adapter copies from an object store (``serve/adapter_cache.py``), against the session's
S3 endpoint (moto's server on 127.0.0.1): copies are bounded by the pool's capacity + 1 however
often the pool cycles its variants, reused while kept, and a broken variant is downloaded once
per failure window, not once per request."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest

from modelfleet.errors import ArtifactError
from modelfleet.serve.adapter_cache import AdapterCache
from modelfleet.storage import join, write_text

ROOT = "s3://modelfleet/adapter-cache"
CAPACITY = 2  # Serve's LRU size per replica (max_models_per_replica)


@pytest.fixture(scope="module")
def artifacts(s3) -> dict[str, str]:
    """Six good variants and a broken one, each a manifest and a weights file in the bucket."""
    uris = {}
    for i in range(3 * CAPACITY):
        uri = join(ROOT, f"v{i}")
        write_text(join(uri, "manifest.json"), json.dumps({"name": f"v{i}", "weights_sha256": f"{i:064x}"}))
        write_text(join(uri, "adapter_model.safetensors"), f"weights of v{i}")
        uris[f"v{i}"] = uri
    broken = join(ROOT, "broken")
    write_text(join(broken, "manifest.json"), json.dumps({"name": "broken", "weights_sha256": "0" * 64}))
    uris["broken"] = broken  # no weights file: its check fails
    return uris


def _check(local: str) -> None:
    manifest = json.loads(Path(local, "manifest.json").read_text())
    weights = Path(local, "adapter_model.safetensors")
    if not weights.is_file() or weights.read_text() != f"weights of {manifest['name']}":
        raise ArtifactError(f"variant {manifest['name']}: adapter weights missing or wrong")


def _on_disk(cache: AdapterCache) -> set[str]:
    root = cache._root  # the one managed directory (made on the first copy)
    return {p.name for p in root.iterdir()} if root is not None else set()


def test_cycling_three_times_the_capacity_twenty_times_keeps_at_most_capacity_plus_one_copies(artifacts):
    cache = AdapterCache(CAPACITY + 1)
    lru: OrderedDict[str, str] = OrderedDict()  # what Serve's multiplexed LRU holds: variant -> copy
    most = 0
    try:
        for _ in range(20):
            for name in [f"v{i}" for i in range(3 * CAPACITY)]:
                local = cache.acquire(name, lambda n=name: artifacts[n], _check)
                assert Path(local, "adapter_model.safetensors").read_text() == f"weights of {name}"
                lru[name] = local
                if len(lru) > CAPACITY:  # Serve evicts the least recent variant: its copy may go
                    cache.release(lru.popitem(last=False)[1])
                most = max(most, len(_on_disk(cache)))
        assert most <= CAPACITY + 1, most
        assert all(Path(p).is_dir() for p in lru.values())  # the loaded variants' copies are kept
        # A variant asked for again while its copy is kept is not downloaded again.
        before = cache.downloads
        again = cache.acquire("v5", lambda: artifacts["v5"], _check)
        assert again == lru["v5"] and cache.downloads == before
        root = cache._root
    finally:
        cache.close()
    assert not root.exists()  # the replica's shutdown removes every copy


def test_a_broken_variant_is_downloaded_once_per_failure_window(artifacts):
    now = [0.0]
    cache = AdapterCache(CAPACITY + 1, failure_window_s=30.0, clock=lambda: now[0])
    resolved = []

    def uri() -> str:
        resolved.append(1)
        return artifacts["broken"]

    try:
        for _ in range(5):  # five requests for the broken variant inside one window
            with pytest.raises(ArtifactError, match="adapter weights missing"):
                cache.acquire("broken", uri, _check)
            now[0] += 5.0
        assert (cache.downloads, len(resolved)) == (1, 1)
        assert not _on_disk(cache)  # a copy that failed its check is not kept
        now[0] += 30.0  # the window has passed: the next request tries again
        with pytest.raises(ArtifactError):
            cache.acquire("broken", uri, _check)
        assert (cache.downloads, len(resolved)) == (2, 2)
        # A good variant is unaffected, and a success clears nothing it should not.
        assert Path(cache.acquire("v0", lambda: artifacts["v0"], _check)).is_dir()
    finally:
        cache.close()
