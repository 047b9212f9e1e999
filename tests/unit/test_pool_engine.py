"""A pool's engine in process (no Ray, no HTTP): rows of one decode batch each use their own LoRA
adapter (peft's mixed batch) and decode exactly as that adapter would alone; an evicted adapter
stays until the sequences using it finish; the tensor bytes count the base once."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model  # the dev extra installs peft: a broken install must fail

from modelfleet.config import ModelConfig  # noqa: E402
from modelfleet.families import get_family  # noqa: E402
from modelfleet.models.gpt import GPT, generate  # noqa: E402
from modelfleet.models.lora import BASE_ROW  # noqa: E402
from modelfleet.serve.engine import Engine, EngineConfig  # noqa: E402
from modelfleet.serve.generation import Job  # noqa: E402
from modelfleet.serve.pool import AdapterPool, tensor_bytes  # noqa: E402

PROMPTS = [[10, 20, 30, 40, 50], [7, 8], [1, 2, 3], [60, 61, 62, 63]]


@pytest.fixture(scope="module", autouse=True)
def _fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # batched matmuls may round differently with other thread counts
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    """A random base GPT and three random adapters saved with peft (dirs), plus each adapter's
    reference model (base + that adapter alone)."""
    torch.manual_seed(0)
    base = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    dirs, refs = {}, {}
    for i, name in enumerate(["a", "b", "c"]):
        torch.manual_seed(10 + i)
        pm = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False),
        ).eval()
        d = tmp_path_factory.mktemp(f"adapter-{name}")
        pm.save_pretrained(d)
        dirs[name], refs[name] = str(d), pm
    return base, dirs, refs


def _greedy(model, prompt, n=6):
    return generate(model, torch.tensor([prompt]), n, temperature=0)[0, len(prompt) :].tolist()


def test_rows_with_different_adapters_share_a_step_and_decode_as_alone(base_and_adapters):
    base, dirs, refs = base_and_adapters
    pool = AdapterPool(copy.deepcopy(base), get_family("gpt"))
    for name, d in dirs.items():
        pool.load(name, d)
    engine = Engine(
        pool.model,
        eos_id=999,
        decode=lambda ids: ",".join(map(str, ids)),
        config=EngineConfig(max_num_seqs=4, prefill_chunk=64),
        adapters=pool,
    )
    which = ["a", "b", None, "c"]  # None: the base alone
    seqs = [engine.add(Job(prompt_ids=p, max_tokens=6, temperature=0, adapter=w)) for p, w in zip(PROMPTS, which)]
    tokens: dict[int, list[int]] = {id(s): [] for s in seqs}
    batch_sizes = []
    while engine.has_work:
        out = engine.step()
        batch_sizes.append(out.decoded)
        for s, _ in out.outputs:
            tokens[id(s)].append(s.next_token)
    assert max(batch_sizes) == 4  # all four variants decoded in one forward
    for s, p, w in zip(seqs, PROMPTS, which):
        want = _greedy(refs[w] if w else base, p)
        assert tokens[id(s)] == want, f"adapter {w}"
    # The adapters really differ from one another and from the base (else the check above is weak).
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        logits = [(refs[w] if w else base)(x)[0, -1] for w in which]
    assert min((logits[i] - logits[j]).abs().max().item() for i in range(4) for j in range(i)) > 1e-3


def test_eviction_waits_for_the_sequences_using_the_adapter(base_and_adapters):
    base, dirs, refs = base_and_adapters
    pool = AdapterPool(copy.deepcopy(base), get_family("gpt"))
    only_base = tensor_bytes(pool.model)
    pool.load("a", dirs["a"])
    one = pool.nbytes
    pool.load("b", dirs["b"])
    assert pool.nbytes - one == one - only_base > 0  # the base is held once; each adapter adds its own
    engine = Engine(pool.model, eos_id=999, decode=str, config=EngineConfig(max_num_seqs=2), adapters=pool)
    engine.add(Job(prompt_ids=PROMPTS[0], max_tokens=6, temperature=0, adapter="a"))
    toks = [s.next_token for s, _ in engine.step().outputs]  # prefill: "a" is in use
    pool.evict("a")
    pool.evict("b")
    toks += [s.next_token for s, _ in engine.step().outputs]
    assert "a" in pool.loaded and "b" not in pool.loaded  # b unused: gone; a still decoding
    while engine.has_work:
        out = engine.step()
        toks += [s.next_token for s, _ in out.outputs]
    assert toks == _greedy(refs["a"], PROMPTS[0])
    engine.step()
    assert "a" not in pool.loaded and pool.nbytes == only_base
    assert pool.load("a", dirs["a"]) > 0  # loads again on demand
    assert BASE_ROW not in pool.loaded
