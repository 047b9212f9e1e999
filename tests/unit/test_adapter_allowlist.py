"""Adapters cannot change the shared base: adapter_config.json is allowlisted (plain LoRA on the
family's layers, bounded r), tensors are checked against the base before the load, and a load
that fails leaves every base parameter and the base's outputs exactly as they were."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from modelfleet.errors import ConfigError
from modelfleet.models import lora
from modelfleet.serve.pool import AdapterPool


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(8, 8)
        self.c_fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.c_fc(self.c_attn(x))


class Fam:
    lora_targets = ["c_attn", "c_fc"]

    def peft_root(self, m):
        return m

    def set_peft_root(self, m, root):
        return root


def _adapter(tmp_path, name="a", **over):
    torch.manual_seed(0)
    d = tmp_path / name
    get_peft_model(
        Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    ).save_pretrained(str(d))
    conf = json.loads((d / lora.ADAPTER_CONFIG).read_text())
    conf.update(over)
    (d / lora.ADAPTER_CONFIG).write_text(json.dumps(conf))
    return d, conf


def _state(m):
    return {k: hashlib.sha256(v.detach().numpy().tobytes()).hexdigest() for k, v in m.state_dict().items()}


def test_plain_lora_config_passes(tmp_path):
    _, conf = _adapter(tmp_path)
    lora.check_adapter_config(conf, Fam.lora_targets, "a")


@pytest.mark.parametrize(
    "key,value",
    [
        ("some_new_knob", 1),  # unknown key
        ("r", 0),
        ("r", lora.MAX_RANK + 1),
        ("r", 4.5),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("bias", "all"),
        ("target_modules", ["lm_head"]),
        ("peft_type", "IA3"),
        ("use_dora", True),
        ("modules_to_save", ["c_fc"]),
        ("layer_replication", [[0, 1]]),
        ("trainable_token_indices", [1, 2]),
        ("rank_pattern", {"c_fc": 512}),
        ("alpha_pattern", {"c_fc": 1e9}),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "olora"),
    ],
)
def test_forbidden_or_out_of_range_config_is_refused(tmp_path, key, value):
    _, conf = _adapter(tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=key):
        lora.check_adapter_config(conf, Fam.lora_targets, "a")


def test_mismatched_adapter_leaves_base_weights_and_outputs_unchanged(tmp_path):
    model = Tiny().eval()
    x = torch.randn(3, 8)
    before, out_before = _state(model), model(x).detach().clone()
    pool = AdapterPool(model, Fam())
    d, _ = _adapter(tmp_path, "bad")
    # Wrong rank in one tensor (the config says r=4), and a non-finite one in another copy.
    save_file({"base_model.model.c_attn.lora_A.weight": torch.zeros(16, 8)}, str(d / lora.ADAPTER_WEIGHTS))
    with pytest.raises(ConfigError, match="shape"):
        pool.load("bad", str(d))
    d2, _ = _adapter(tmp_path, "nan")
    t = torch.zeros(4, 8)
    t[0, 0] = float("nan")
    save_file({"base_model.model.c_attn.lora_A.weight": t}, str(d2 / lora.ADAPTER_WEIGHTS))
    with pytest.raises(ConfigError, match="non-finite"):
        pool.load("nan", str(d2))
    assert not pool.loaded and not any("lora" in n for n, _ in pool.model.named_modules())
    assert _state(pool.model) == before
    assert torch.equal(pool.model(x), out_before)


def test_failed_first_load_half_way_is_rolled_back(tmp_path, monkeypatch):
    """A load that fails inside peft (after the checks) leaves no LoRA layer injected."""
    model = Tiny().eval()
    x = torch.randn(3, 8)
    before, out_before = _state(model), model(x).detach().clone()
    pool = AdapterPool(model, Fam())
    d, _ = _adapter(tmp_path, "boom")

    def fail(*a, **k):
        raise RuntimeError("disk gone half-way")

    monkeypatch.setattr(lora.peft().PeftModel, "load_adapter", fail)  # from_pretrained injects, then loads
    with pytest.raises(RuntimeError):
        pool.load("boom", str(d))
    assert not any("lora" in n for n, _ in pool.model.named_modules())
    assert _state(pool.model) == before and torch.equal(pool.model(x), out_before)
    monkeypatch.undo()
    pool.load("ok", str(d))  # and a good adapter still loads afterwards
    assert "ok" in pool.loaded and not torch.equal(pool.model(x), out_before)
