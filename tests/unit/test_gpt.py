"""GPT: loss at init, learning, tied weights, parameter/FLOP counts, KV cache, checkpointing."""

import math

import pytest
import torch

from modelfleet.config import ModelConfig
from modelfleet.families import build_model
from modelfleet.models import GPT, flops_per_token, generate, num_params
from modelfleet.models.sampling import sample


def make_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=264, n_layer=2, n_head=4, n_embd=64, block_size=32)
    return ModelConfig(**{**base, **kw})


def make_model(seed: int = 0, sharpen: bool = False, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(make_cfg(**kw)).eval()
    if sharpen:
        # GPT-2 init gives near-uniform logits; larger weights make attention peaky, so a wrong
        # mask or position would move logits far more than the 1e-5 tolerance.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.15)
    return model


def test_build_model_and_unknown_family():
    assert isinstance(build_model(make_cfg()), GPT)
    with pytest.raises(ValueError, match=r"model\.family.*'nope'.*gpt"):
        build_model(make_cfg(family="nope"))


def test_init_is_deterministic():
    a, b = make_model(seed=3), make_model(seed=3)
    c = make_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["wte.weight"], sc["wte.weight"])


def test_untrained_loss_is_near_ln_vocab():
    model = make_model()
    idx = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(264)) < 0.3


def test_ignore_index_is_ignored():
    model = make_model()
    idx = torch.randint(0, 257, (2, 16))
    targets = idx.clone()
    full = model(idx, targets)
    targets[:, 8:] = -100
    half = model(idx, targets)
    logits = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 264), idx[:, :8].reshape(-1))
    assert torch.allclose(half, manual, atol=1e-6)
    assert not torch.allclose(half, full)


def test_adamw_steps_reduce_loss():
    model = make_model().train()
    seq = torch.arange(10).repeat(4)[:33].unsqueeze(0).repeat(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_lm_head_is_tied_to_token_embedding():
    model = make_model()
    assert model.lm_head.weight is model.wte.weight
    assert sum(1 for _ in model.parameters() if _ is model.wte.weight) == 1


def test_num_params_matches_manual_count():
    for bias in (False, True):
        cfg = make_cfg(bias=bias)
        model = GPT(cfg)
        d, v, L, T, b = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.block_size, int(bias)
        per_block = (
            2 * d * (1 + b)  # ln_1, ln_2
            + 3 * d * d
            + 3 * d * b  # c_attn
            + d * d
            + d * b  # attn c_proj
            + 4 * d * d
            + 4 * d * b  # c_fc
            + 4 * d * d
            + d * b
        )  # mlp c_proj
        total = v * d + T * d + L * per_block + d * (1 + b)  # wte (= lm_head), wpe, blocks, ln_f
        assert num_params(model) == total
        assert num_params(model) == sum(p.numel() for p in model.state_dict().values()) - v * d
        assert num_params(model, exclude_embeddings=True) == total - T * d  # wte stays: it is lm_head


def test_flops_per_token_formula():
    cfg = make_cfg(bias=True)
    n = num_params(GPT(cfg), exclude_embeddings=True)
    assert flops_per_token(cfg) == 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_too_long_input_raises():
    model = make_model()
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_cache(1, 32)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cached length 30"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(1, 33)


def test_kv_cache_incremental_matches_full_forward():
    model = make_model(sharpen=True)
    idx = torch.randint(0, 257, (3, 20), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = model.new_cache(3, 20)
    parts = [model(idx[:, :7], cache=cache)]  # prefill
    parts += [model(idx[:, t : t + 1], cache=cache) for t in range(7, 12)]  # one token at a time
    parts.append(model(idx[:, 12:], cache=cache))  # a multi-token chunk after decoding
    assert cache.length == 20
    assert (full - torch.cat(parts, dim=1)).abs().max().item() < 1e-5


def test_kv_cache_left_padded_batch_matches_unpadded_rows():
    model = make_model(sharpen=True)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 257, (5,), generator=g), torch.randint(0, 257, (9,), generator=g)]
    new_tokens = torch.randint(0, 257, (2, 4), generator=g)
    P = max(len(p) for p in prompts)
    idx = torch.full((2, P), 256, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, P - len(p) :], mask[b, P - len(p) :] = p, 1

    cache = model.new_cache(2, P + 4)
    logits = [model(idx, cache=cache, attention_mask=mask)]
    for t in range(4):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        logits.append(model(new_tokens[:, t : t + 1], cache=cache, attention_mask=mask))
    logits = torch.cat(logits, dim=1)
    assert torch.isfinite(logits).all()  # padding queries must not produce NaN

    for b, p in enumerate(prompts):
        ref = model(torch.cat([p, new_tokens[b]]).unsqueeze(0))[0]
        got = logits[b, P - len(p) :]
        assert (ref - got).abs().max().item() < 1e-5
    # Padding changes nothing for the full-length row versus running it alone.
    assert (logits[1] - model(torch.cat([prompts[1], new_tokens[1]])[None])[0]).abs().max() < 1e-5


def test_attention_mask_shape_is_checked():
    model = make_model()
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[1, 4\]"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache, attention_mask=torch.ones(1, 3))


def test_activation_checkpointing_gives_same_gradients(monkeypatch):
    idx = torch.randint(0, 257, (2, 17), generator=torch.Generator().manual_seed(3))
    grads = []
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*a, **kw):
        calls.append(kw.get("use_reentrant"))
        return real(*a, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    for ckpt in (False, True):
        model = make_model(seed=5).train()
        model.activation_checkpointing = ckpt
        model(idx[:, :-1], idx[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls == [False, False]  # once per block, only in the checkpointed run
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=0), name


def test_generate_greedy_matches_argmax_without_cache():
    model = make_model(sharpen=True)
    idx = torch.randint(0, 257, (2, 6), generator=torch.Generator().manual_seed(4))
    out = generate(model, idx, 8, temperature=0.0)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], idx)
    ref = idx
    for _ in range(8):
        ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    # top_p that keeps only the top token is greedy too.
    assert torch.equal(generate(model, idx, 8, top_p=1e-6, generator=torch.Generator().manual_seed(0)), ref)


def test_generate_sampling_is_reproducible_and_stops_at_eos():
    model = make_model(sharpen=True).train()
    idx = torch.randint(0, 257, (3, 4), generator=torch.Generator().manual_seed(5))
    a = generate(model, idx, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = generate(model, idx, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and model.training  # mode restored
    # Every row's first sampled token as eos: all rows are done after one step.
    first = generate(model, idx[:1], 1, temperature=0.0)[0, -1].item()
    out = generate(model, idx[:1], 10, temperature=0.0, eos_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first
    with pytest.raises(ValueError, match="block_size=32"):
        generate(model, idx, 29)


def test_sampler_greedy_nucleus_tiny_temperatures_and_shapes():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    assert sample(logits, 0, 1.0).tolist() == [0, 2]
    assert sample(logits[0], 0, 1.0).shape == ()  # one row in, one id out
    # A temperature too small to matter is greedy, not NaN (float64, shifted by the max).
    for t in (1e-45, 5e-324):
        assert sample(logits, t, 1.0, torch.Generator().manual_seed(0)).tolist() == [0, 2]
    # top_p=0.7 keeps {0.5, 0.3} in row 0 and {0.8} in row 1; the rest is never drawn.
    g = torch.Generator().manual_seed(1)
    drawn = torch.stack([sample(logits, 1.0, 0.7, g) for _ in range(300)])
    assert set(drawn[:, 0].tolist()) == {0, 1} and set(drawn[:, 1].tolist()) == {2}
    # Temperature 1 follows the distribution: token 2 of row 0 comes up about 20% of the time.
    g = torch.Generator().manual_seed(2)
    share = (torch.stack([sample(logits[0], 1.0, 1.0, g) for _ in range(2000)]) == 2).float().mean()
    assert 0.15 < share < 0.25
