"""Pretrained Hugging Face models through the paged engine (models/hf.py's attention function over
models/paged_kv.py): logits equal transformers' own forward within 1e-5 (fp32) on every config of
the tested matrix, one forward per step for all rows (mixed-adapter rows included), and what the
engine picks for configs outside it."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from modelfleet.models.hf import HFCausalLM
from modelfleet.models.lora import BASE_ROW, adapter_rows, install_row_hooks
from modelfleet.serve.engine import Engine, EngineConfig, SlotEngine, new_engine
from modelfleet.serve.generation import Job

PROMPTS = [[5, 9, 2, 7, 1], [3], list(range(10, 40)), [8, 8, 8, 4, 4, 4, 6, 6, 6, 2, 2]]

GPT2 = {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64, "vocab_size": 64}
LLAMA = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "hidden_size": 32,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
    "vocab_size": 64,
}
MATRIX = {
    "gpt2": ("gpt2", {}),
    "gpt2-inverse-layer-scaling": ("gpt2", {"scale_attn_by_inverse_layer_idx": True}),
    "gpt2-reorder-upcast": ("gpt2", {"reorder_and_upcast_attn": True}),
    "llama": ("llama", {}),
    "llama-gqa": ("llama", {"num_key_value_heads": 2}),
    "llama-head-dim-override": ("llama", {"head_dim": 16}),
    "llama-rope-scaling": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
}


def _hf(kind: str, extra: dict) -> HFCausalLM:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(**{**GPT2, **extra}, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(**{**LLAMA, **extra}, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    return HFCausalLM(model.eval(), block_size=64)


@pytest.mark.parametrize("name", list(MATRIX))
def test_paged_logits_equal_transformers_own_forward(name):
    kind, extra = MATRIX[name]
    m = _hf(kind, extra)
    assert m.supports_paged
    cache = m.new_paged_cache(32, 4)
    tables = [[3, 1], [7], [0, 2, 4, 6, 8, 10, 12, 14], [5, 9, 11]]
    with torch.inference_mode():
        first = [p[:-1] or p[:1] for p in PROMPTS]  # a mixed prefill step, then one decode step
        m.forward_paged(torch.tensor(sum(first, [])), cache, tables, [0] * 4, [len(f) for f in first])
        starts = [max(len(p) - 1, 0) for p in PROMPTS]
        last = m.forward_paged(torch.tensor([p[-1] for p in PROMPTS]), cache, tables, starts, [1] * 4)
        for b, p in enumerate(PROMPTS):
            ref = m.hf(input_ids=torch.tensor([p])).logits[0, -1]
            assert torch.allclose(last[b], ref, atol=1e-5), (name, b, (last[b] - ref).abs().max())


def test_hf_rows_decode_in_one_forward_per_step_as_each_would_alone():
    m = _hf("llama", {"num_key_value_heads": 2})
    engine = new_engine(m, eos_id=-1, decode=str, config=EngineConfig(max_num_seqs=4, block_size=4))
    assert isinstance(engine, Engine)
    jobs = [Job(prompt_ids=p, max_tokens=6, temperature=0) for p in PROMPTS]
    reqs = [engine.add(j) for j in jobs]
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    assert engine.runner.forwards == steps  # one forward per step for all four rows
    slot = SlotEngine(m, eos_id=-1, decode=str, config=EngineConfig(max_num_seqs=4))
    others = [slot.add(j) for j in jobs]
    while slot.has_work:
        slot.step()
    assert [r.row.ids for r in reqs] == [o.row.ids for o in others]  # = transformers' per-row decoding


def test_mixed_adapter_rows_share_one_forward_and_match_each_adapter_alone():
    base = _hf("gpt2", {})
    peft_model = get_peft_model(
        copy.deepcopy(base.hf), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True), adapter_name="a"
    )
    peft_model.add_adapter("b", LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # peft initialises B to zero: make each adapter really change the output
            torch.nn.init.normal_(p, std=0.5)
    install_row_hooks(peft_model)
    m = HFCausalLM(peft_model.eval(), block_size=64)
    cache = m.new_paged_cache(16, 4)
    which = ["a", "b", BASE_ROW]
    prompts = PROMPTS[:3]
    tables = [[0, 1], [2], [3, 4, 5, 6, 7, 8, 9, 10]]
    with torch.inference_mode():
        ids = torch.tensor(sum(prompts, []))
        lens = [len(p) for p in prompts]
        with adapter_rows([w for w, n in zip(which, lens) for _ in range(n)]):
            got = m.forward_paged(ids, cache, tables, [0] * 3, lens)
        refs = []
        for w, p in zip(which, prompts):
            with adapter_rows([w]):
                refs.append(peft_model(input_ids=torch.tensor([p])).logits[0, -1])
    for b in range(3):
        assert torch.allclose(got[b], refs[b], atol=1e-5), (which[b], (got[b] - refs[b]).abs().max())
    assert (refs[0] - refs[1]).abs().max() > 1e-3 and (refs[0] - refs[2]).abs().max() > 1e-3


def test_an_architecture_outside_the_matrix_keeps_the_per_row_path():
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32, vocab_size=64
    )
    m = HFCausalLM(transformers.GPTNeoXForCausalLM(cfg).eval(), block_size=32)
    assert not m.supports_paged
    assert isinstance(new_engine(m, eos_id=0, decode=str, config=EngineConfig(max_num_seqs=2)), SlotEngine)
