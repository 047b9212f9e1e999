"""Pools (many LoRA variants of one base on one replica set) over real Serve and HTTP (port 8270):
a request's ``model`` picks the variant and gets that adapter's answer; Serve's multiplexed
routing keeps each variant on the replica that holds it; an unknown variant is a 404 naming the
pool's variants; variants are added and removed in place under load, with no replica restart
and no failed request."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import httpx
import peft  # noqa: F401  the dev extra installs it: a broken install must fail here, not skip
import pytest

from helpers import publish_adapters, publish_tiny_models, run_load, serve_on, serve_replica_pids

PORT = 8270
PROBE = "def main("


@pytest.fixture(scope="module")
def pool(ray_session, tmp_path_factory):
    """Pool ``tiny`` (base tiny@v1) with variants a0, a1 on 2 replicas holding one variant each:
    with a cache that small, only routing by variant keeps requests from reloading adapters."""
    from modelfleet.serve.operations import deploy

    storage = tmp_path_factory.mktemp("pool-storage")
    base = publish_tiny_models(storage, seeds=(1, 2), probe=PROBE)["v1"]  # v2: other base weights
    adapters = publish_adapters(storage, "tiny@v1", ("a0", "a1", "a2"), probe=PROBE)
    with serve_on(PORT):
        deploy(
            {
                "app_name": "pool",
                "route_prefix": "/pool",
                "port": PORT,
                "storage_path": str(storage),
                "ingress": {"num_cpus": 0.05},
                "models": [
                    {
                        "name": "tiny",
                        "artifact": "tiny@v1",
                        "num_replicas": 2,
                        "ray_actor_options": {"num_cpus": 0.5},
                        "max_models_per_replica": 1,
                        "variants": {"a0": adapters["a0"]["ref"], "a1": adapters["a1"]["ref"]},
                    }
                ],
            }
        )
        yield SimpleNamespace(url=f"http://127.0.0.1:{PORT}/pool", storage=storage, base=base, adapters=adapters)


def _ask(url: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions", json={"model": model, "prompt": PROBE, "max_tokens": 8, "temperature": 0}, timeout=60
    )


def test_model_field_selects_the_variant_and_models_lists_every_name(pool):
    answers = {"tiny": pool.base, **{n: pool.adapters[n]["answer"] for n in ("a0", "a1")}}
    assert len(set(answers.values())) == 3  # the adapters change the answer: the check below can fail
    for name, want in answers.items():
        r = _ask(pool.url, name)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want, name
        assert r.headers.get("x-modelfleet-variant") == (None if name == "tiny" else name)
    cards = {c["id"]: c for c in httpx.get(f"{pool.url}/v1/models", timeout=30).json()["data"]}
    assert set(cards) == {"tiny", "a0", "a1"}
    assert cards["a0"]["pool"] == cards["a1"]["pool"] == "tiny" and cards["tiny"]["pool"] is None
    assert cards["a1"]["artifact"] == "a1@v1" and cards["tiny"]["artifact"] == "tiny@v1"


def test_serve_routes_each_variant_to_the_replica_holding_it(pool):
    """Two replicas, one variant each at most, requests alternating a0/a1: routed at random, about
    half would land on the replica holding the other variant and reload (a miss); routed by
    variant, once each replica holds one, every request is a hit."""
    seen: list[tuple[str, str, str]] = []
    streak = 0
    for i in range(60):  # warm-up, bounded: until 6 hits in a row (routing info has reached the ingress)
        r = _ask(pool.url, ("a0", "a1")[i % 2])
        assert r.status_code == 200, r.text
        streak = streak + 1 if r.headers["x-modelfleet-variant-cache"] == "hit" else 0
        if streak >= 6:
            break
    assert streak >= 6, "requests kept reloading adapters: Serve is not routing by variant"
    for i in range(20):
        r = _ask(pool.url, ("a0", "a1")[i % 2])
        seen.append(
            (("a0", "a1")[i % 2], r.headers["x-modelfleet-variant-cache"], r.headers["x-modelfleet-replica-pid"])
        )
    hits = sum(1 for _, c, _ in seen if c == "hit")
    assert hits >= 19, seen
    homes = {v: {pid for w, _, pid in seen if w == v} for v in ("a0", "a1")}
    assert not homes["a0"] & homes["a1"], homes  # each variant stays on its own replica


def test_a_variant_id_the_pool_was_not_configured_with_is_refused_before_any_fetch(pool):
    """The replica itself refuses a multiplexed id that is not one of its configured variants (what a
    client header could carry, or a variant removed since): here a valid adapter under a name the
    pool does not serve, sent to the pool's deployment through its handle, is never loaded."""
    from ray import serve

    from modelfleet.serve.protocol import ReplicaError, Sampling

    handle = serve.get_deployment_handle("model-tiny", app_name="pool")
    r = (
        handle.options(multiplexed_model_id=f"smuggled={pool.adapters['a0']['ref']}")
        .complete.remote(PROBE, Sampling(max_tokens=2, temperature=0.0))
        .result(timeout_s=60)
    )
    assert isinstance(r, ReplicaError), r
    assert r.status == 404 and r.code == "model_not_found" and "not a configured variant" in r.message, r


def test_unknown_variant_is_a_404_naming_the_pools_variants(pool):
    r = _ask(pool.url, "a9")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "tiny (variants: a0, a1)" in err["message"], err["message"]


def test_variants_are_added_and_removed_in_place_under_load(pool):
    from modelfleet.errors import ConfigError
    from modelfleet.serve.client import Client
    from modelfleet.serve.operations import update_pool

    before = sorted(serve_replica_pids("pool", "model-tiny") + serve_replica_pids("pool", "ingress"))
    assert len(before) == 3
    stop = threading.Event()
    loads = {}

    def load(model: str) -> None:
        loads[model] = run_load(
            Client(pool.url, timeout_s=60),
            400,
            2,
            deadline_s=120,
            stop=stop,
            model=model,
            prompt=PROBE,
            max_tokens=8,
            temperature=0,
        )

    threads = [threading.Thread(target=load, args=(m,)) for m in ("tiny", "a0")]
    for t in threads:
        t.start()
    try:
        assert "added variant a2" in update_pool("pool", "tiny", add=("a2", pool.adapters["a2"]["ref"]))
        r = _ask(pool.url, "a2")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == pool.adapters["a2"]["answer"]
        assert "removed variant a1" in update_pool("pool", "tiny", remove="a1")
        r = _ask(pool.url, "a1")
        assert r.status_code == 404 and "tiny (variants: a0, a2)" in r.json()["error"]["message"]
        with pytest.raises(ConfigError, match="full model, not a LoRA adapter"):
            update_pool("pool", "tiny", add=("full", "tiny@v1"))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    for model, res in loads.items():
        assert res.ok > 0 and not res.failed, (model, res.failed[:3])
    assert set(loads["a0"].texts) == {pool.adapters["a0"]["answer"]}
    after = sorted(serve_replica_pids("pool", "model-tiny") + serve_replica_pids("pool", "ingress"))
    assert after == before  # reconfigured in place: the same processes


def test_moving_a_pool_to_other_base_weights_is_refused_naming_its_variants(pool):
    from modelfleet.errors import ConfigError
    from modelfleet.serve.operations import update_model

    with pytest.raises(ConfigError, match=r"pool 'tiny'\'s variants a0, a2 were trained over its current base"):
        update_model("pool", "tiny", "v2")
    r = _ask(pool.url, "a0")  # nothing changed
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == pool.adapters["a0"]["answer"]
