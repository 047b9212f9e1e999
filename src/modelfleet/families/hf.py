"""The ``hf`` family hooks (data, training, serving) around ``models/hf.py``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from modelfleet.config import Config, ModelConfig
from modelfleet.data.prepare import write_token_rows
from modelfleet.errors import ConfigError
from modelfleet.families.base import Family
from modelfleet.families.gpt import TokenRows, lm_predict_batch
from modelfleet.families.lora import LoraHooks
from modelfleet.models.hf import HF_DIR, HFCausalLM, HFParams, _transformers
from modelfleet.registry import fetch


class HFTokenizer:
    """A Hugging Face tokenizer with the small interface our serving code uses."""

    type = "hf"

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


class HFCausalLMFamily(TokenRows, LoraHooks, Family):
    name = "hf-causal-lm"
    task = "lm"
    Params = HFParams
    primary_metric = "perplexity"
    serves_openai = True
    cache_epochs = False
    needs_ray_to_prepare = False

    def parse_params(self, params: dict[str, Any]) -> HFParams:
        p = super().parse_params(params)
        if not p.path:
            raise ConfigError("model.params.path: is empty; set it to a local Hugging Face model directory")
        return p

    def build(self, cfg: ModelConfig) -> nn.Module:
        """The pretrained weights from ``params.path`` (fp32); with LoRA, the base artifact's
        Hugging Face copy wrapped with a fresh adapter."""
        p = self.parse_params(cfg.params)
        if p.lora is not None:
            return self.with_lora(self.build_base(cfg, fetch(p.lora.base)), p.lora)
        if not os.path.isfile(os.path.join(p.path, "config.json")):
            raise ConfigError(f"model.params.path: {p.path!r} holds no Hugging Face model (no config.json)")
        hf = _transformers().AutoModelForCausalLM.from_pretrained(p.path, dtype=torch.float32)
        return HFCausalLM(hf, p.block_size)

    def build_base(self, cfg: ModelConfig, base_dir: str) -> nn.Module:
        hf = _transformers().AutoModelForCausalLM.from_pretrained(os.path.join(base_dir, HF_DIR), dtype=torch.float32)
        return HFCausalLM(hf, self.parse_params(cfg.params).block_size)

    def peft_root(self, model: nn.Module) -> nn.Module:
        return model.hf  # adapter tensor names as peft + transformers name them for this model

    def set_peft_root(self, model: nn.Module, root: nn.Module) -> nn.Module:
        model.hf = root
        return model

    def build_sharded(self, cfg: ModelConfig, ds_config: dict[str, Any]) -> nn.Module:
        """The way DeepSpeed's Hugging Face integration does it: while an ``HfDeepSpeedConfig`` of
        ZeRO-3 is alive, ``from_pretrained`` builds under ``deepspeed.zero.Init`` and streams the
        checkpoint's tensors into the partitions."""
        from transformers.integrations import HfDeepSpeedConfig

        self._zero3 = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
        return self.build(cfg)

    def build_for_artifact(self, cfg: ModelConfig, local_dir: str) -> nn.Module:
        """The architecture from the artifact's own Hugging Face config; weights load after."""
        t = _transformers()
        hf = t.AutoModelForCausalLM.from_config(
            t.AutoConfig.from_pretrained(os.path.join(local_dir, HF_DIR)), dtype=torch.float32
        )
        return HFCausalLM(hf, self.parse_params(cfg.params).block_size)

    def tokenizer(self, path: str) -> HFTokenizer:
        return HFTokenizer(_transformers().AutoTokenizer.from_pretrained(path))

    # ---------------------------------------------------------------- data
    def prepare(self, cfg: Config, *, overwrite: bool = False) -> dict[str, Any]:
        """Documents -> this model's tokenizer -> fixed rows of block_size + 1 tokens (gpt layout)."""

        p = self.parse_params(cfg.model.params)
        tok = self.tokenizer(p.path)
        return write_token_rows(
            cfg.data,
            p.block_size,
            tok.encode,
            tok.eos_id,
            {"type": "hf", "path": p.path, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
            overwrite=overwrite,
        )

    def preflight(self, cfg: Config, meta: dict[str, Any]) -> None:
        self.resolve_lora_base(cfg)
        p = self.parse_params(cfg.model.params)
        if meta.get("seq_len") != p.block_size:
            raise ConfigError(
                f"model.params.block_size: {p.block_size} does not match the dataset's "
                f"{meta.get('seq_len')}-token rows; re-run `modelfleet prepare` with this config"
            )
        if meta["tokenizer"].get("type") != "hf":
            raise ConfigError(
                f"data.path: {cfg.data.path} was tokenized with {meta['tokenizer'].get('type')!r}, "
                "not this model's tokenizer; re-run `modelfleet prepare` with this config"
            )

    # ---------------------------------------------------------------- training
    # collate, loss, forward and probe: TokenRows (the same token-row layout as gpt)
    def units_per_sample(self, cfg: Config) -> int:
        return self.parse_params(cfg.model.params).block_size

    # ---------------------------------------------------------------- artifacts
    def write_preprocessor(self, out_dir: str, cfg: Config, transform: dict[str, Any] | None) -> dict[str, Any]:
        src = self.parse_params(cfg.model.params).path
        self.tokenizer(src).tok.save_pretrained(os.path.join(out_dir, HF_DIR))
        return {"tokenizer": {"type": "hf", "path": HF_DIR}, "hf_format": HF_DIR}

    def write_extra(self, model: Any, cfg: Config, out_dir: str) -> None:
        """The Hugging Face copy: ``from_pretrained(<artifact>/hf)`` loads the trained weights."""
        model.hf.save_pretrained(os.path.join(out_dir, HF_DIR), safe_serialization=True)

    def load_preprocessor(self, local_dir: str, manifest: dict[str, Any]) -> HFTokenizer:
        return self.tokenizer(os.path.join(local_dir, HF_DIR))

    def predict_batch(self, model: Any, transform: Any, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return lm_predict_batch(model, raw)
