"""The ``hf-causal-lm`` family: a Hugging Face causal LM (GPT-2, Llama, ... anything
``AutoModelForCausalLM`` loads) from a local directory, fine-tuned through the same Ray Train +
DeepSpeed loop, exported in our artifact layout *and* in Hugging Face format (``hf/``:
safetensors + config + tokenizer), served through the OpenAI-compatible API with its own
tokenizer. Needs the ``hf`` extra (``pip install 'modelfleet[hf]'``); nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelfleet.config import Config, ConfigError, ModelConfig
from modelfleet.models.gpt_family import TokenRows
from modelfleet.models.family import Family

HF_DIR = "hf"
"""Artifact subdirectory holding the Hugging Face copy (``from_pretrained`` loads it)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.family: hf-causal-lm needs transformers; install the extra with "
                          "`pip install 'modelfleet[hf]'`") from None
    transformers.logging.set_verbosity_error()
    return transformers


@dataclass(kw_only=True)
class HFParams:
    path: str = ""
    """Local directory with a Hugging Face causal LM and its tokenizer (``save_pretrained`` layout)."""
    block_size: int = 64
    """Training sequence length in tokens (at most the model's maximum positions)."""


class _Cache:
    """The serving KV cache: Hugging Face's ``past_key_values`` plus the filled length."""

    def __init__(self) -> None:
        self.pkv: Any = None
        self.length = 0


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the interface of our GPT (logits, loss, KV-cache decoding),
    so the training loop, export and the batched generator use it unchanged."""

    def __init__(self, hf: nn.Module, block_size: int) -> None:
        super().__init__()
        self.hf = hf
        limit = getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", block_size)
        self.cfg = SimpleNamespace(block_size=int(limit), train_block_size=block_size)

    def new_cache(self, batch_size: int, max_len: int, dtype: Any = None, device: Any = None) -> _Cache:
        return _Cache()

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: _Cache | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        kw: dict[str, Any] = {}
        if attention_mask is not None:
            # Left padding: positions count real tokens, as in our GPT's batched decoding.
            start = cache.length if cache is not None else 0
            kw["attention_mask"] = attention_mask.long()
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        if cache is not None:
            out = self.hf(input_ids=idx, past_key_values=cache.pkv, use_cache=True, **kw)
            cache.pkv, cache.length = out.past_key_values, cache.length + idx.size(1)
        else:
            out = self.hf(input_ids=idx, use_cache=False, **kw)
        logits = out.logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


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


class HFCausalLMFamily(TokenRows, Family):
    name = "hf-causal-lm"
    task = "lm"
    Params = HFParams
    primary_metric = "perplexity"
    serves_openai = True
    cache_epochs = False

    def parse_params(self, params: dict[str, Any]) -> HFParams:
        p = super().parse_params(params)
        if not p.path:
            raise ConfigError("model.params.path: is empty; set it to a local Hugging Face model directory")
        return p

    def build(self, cfg: ModelConfig) -> nn.Module:
        """The pretrained weights from ``params.path`` (fp32)."""
        p = self.parse_params(cfg.params)
        if not os.path.isfile(os.path.join(p.path, "config.json")):
            raise ConfigError(f"model.params.path: {p.path!r} holds no Hugging Face model (no config.json)")
        hf = _transformers().AutoModelForCausalLM.from_pretrained(p.path, dtype=torch.float32)
        return HFCausalLM(hf, p.block_size)

    def build_for_artifact(self, cfg: ModelConfig, local_dir: str) -> nn.Module:
        """The architecture from the artifact's own Hugging Face config; weights load after."""
        t = _transformers()
        hf = t.AutoModelForCausalLM.from_config(t.AutoConfig.from_pretrained(os.path.join(local_dir, HF_DIR)),
                                                dtype=torch.float32)
        return HFCausalLM(hf, self.parse_params(cfg.params).block_size)

    def tokenizer(self, path: str) -> HFTokenizer:
        return HFTokenizer(_transformers().AutoTokenizer.from_pretrained(path))

    # ---------------------------------------------------------------- data
    def prepare(self, cfg: Config, *, overwrite: bool = False) -> dict[str, Any]:
        """Documents -> this model's tokenizer -> fixed rows of block_size + 1 tokens (gpt layout)."""
        from modelfleet.data.prepare import write_token_rows

        p = self.parse_params(cfg.model.params)
        tok = self.tokenizer(p.path)
        return write_token_rows(cfg.data, p.block_size, tok.encode, tok.eos_id,
                                {"type": "hf", "path": p.path, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
                                overwrite=overwrite)

    def preflight(self, cfg: Config, meta: dict[str, Any]) -> None:
        p = self.parse_params(cfg.model.params)
        if meta.get("seq_len") != p.block_size:
            raise ConfigError(f"model.params.block_size: {p.block_size} does not match the dataset's "
                              f"{meta.get('seq_len')}-token rows; re-run `modelfleet prepare` with this config")
        if meta["tokenizer"].get("type") != "hf":
            raise ConfigError(f"data.path: {cfg.data.path} was tokenized with {meta['tokenizer'].get('type')!r}, "
                              "not this model's tokenizer; re-run `modelfleet prepare` with this config")

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
        from modelfleet.models.gpt_family import lm_predict_batch

        return lm_predict_batch(model, raw)
