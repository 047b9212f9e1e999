"""The ``gpt`` family: the from-scratch byte-level GPT of ``models/gpt.py`` on prepared token rows."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from modelfleet.config import Config, ModelConfig
from modelfleet.data.prepare import check_seq_len, prepare_dataset
from modelfleet.data.tokenizer import ByteTokenizer, tokenizer_from_spec
from modelfleet.errors import ArtifactError, ConfigError
from modelfleet.families.base import Family
from modelfleet.families.lora import LoraHooks
from modelfleet.models.gpt import GPT
from modelfleet.models.lora import LoraParams
from modelfleet.registry import WEIGHTS, fetch
from modelfleet.storage import dump_json, read_json, sha256_file

ARCH_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "bias")
"""``model.*`` fields a LoRA run must share with its base artifact."""


@dataclasses.dataclass(kw_only=True)
class GPTParams:
    lora: LoraParams | None = None
    """LoRA fine-tuning over a base artifact instead of training every weight (see models/lora.py)."""


class TokenRows:
    """Training on prepared token rows (next-token loss): shared by every causal-LM family."""

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        t = batch["tokens"]
        arr = np.stack(t) if t.dtype == object else np.asarray(t)
        return {"tokens": torch.from_numpy(arr.astype(np.int64))}

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        seq = batch["tokens"]
        return model(seq[:, :-1], seq[:, 1:])

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        return model(batch["tokens"])

    def probe(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"tokens": batch["tokens"][:2, :-1].contiguous()}


class GPTFamily(TokenRows, LoraHooks, Family):
    name = "gpt"
    task = "lm"
    Params = GPTParams
    primary_metric = "perplexity"
    serves_openai = True
    cache_epochs = False
    needs_ray_to_prepare = False
    lora_targets = ["c_attn", "c_proj", "c_fc"]

    def build(self, cfg: ModelConfig) -> Any:
        p = self.lora_params(cfg)
        if p is None:
            return GPT(cfg)
        return self.with_lora(self.build_base(cfg, fetch(p.base)), p)

    def build_base(self, cfg: ModelConfig, base_dir: str) -> Any:
        from safetensors.torch import load_model

        model = GPT(cfg)
        load_model(model, _base_weights(base_dir))
        return model

    def build_sharded(self, cfg: ModelConfig, ds_config: dict[str, Any]) -> Any:
        """Partitions from the start, then GPT-2's initialisation (tied ``lm_head`` included) run
        again one module at a time on gathered parameters: the weights equal a ZeRO-2 build's (the
        constructor's own pass wrote into empty partitions). With LoRA the frozen base's weights
        are written the same way, one module at a time, then the adapter wraps the sharded base."""
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = GPT(cfg)
        gather = lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)  # noqa: E731
        p = self.lora_params(cfg)
        if p is None:
            model.init_weights(gather=gather)
            return model
        from safetensors.torch import load_file

        weights = load_file(_base_weights(fetch(p.base)))
        names: dict[int, list[str]] = {}  # tied tensors are saved under one of their names
        for n, t in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(t), []).append(n)
        for m in model.modules():
            own = list(m.parameters(recurse=False))
            if own:
                with gather(own):
                    for t in own:
                        t.data.copy_(weights[next(k for k in names[id(t)] if k in weights)])
        return self.with_lora(model, p)

    def prepare(self, cfg: Config, *, overwrite: bool = False) -> dict[str, Any]:
        return prepare_dataset(cfg.data, cfg.model.block_size, ByteTokenizer(), overwrite=overwrite)

    def preflight(self, cfg: Config, meta: dict[str, Any]) -> None:
        self.resolve_lora_base(cfg)
        if self.lora_params(cfg.model) is not None:
            base = read_json(fetch(cfg.model.params["lora"]["base"]), "config.json")
            for k in ARCH_KEYS:
                if base.get(k) != getattr(cfg.model, k):
                    raise ConfigError(
                        f"model.{k}: {getattr(cfg.model, k)} does not match the LoRA base artifact's "
                        f"{base.get(k)}; an adapter trains over the base's own architecture"
                    )
        check_seq_len(meta, cfg.model.block_size)
        if meta["tokenizer"]["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset's "
                f"tokenizer vocabulary ({meta['tokenizer']['vocab_size']})"
            )

    def write_preprocessor(self, out_dir: str, cfg: Config, transform: dict[str, Any] | None) -> dict[str, Any]:
        spec = ByteTokenizer().spec()
        dump_json(out_dir, "tokenizer.json", spec)
        return {"tokenizer": spec}

    def load_preprocessor(self, local_dir: str, manifest: dict[str, Any]) -> Any:
        import json
        import os

        with open(os.path.join(local_dir, "tokenizer.json")) as f:
            return tokenizer_from_spec(json.load(f))

    def units_per_sample(self, cfg: Config) -> int:
        return cfg.model.block_size

    def predict_batch(self, model: Any, transform: Any, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return lm_predict_batch(model, raw)


def lm_predict_batch(model: Any, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token rows -> summed next-token negative log-likelihood and token counts (perplexity)."""
    import torch
    import torch.nn.functional as F

    t = raw["tokens"]
    seq = torch.from_numpy((np.stack(t) if t.dtype == object else np.asarray(t)).astype(np.int64))
    with torch.no_grad():
        logits = model(seq[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), seq[:, 1:], reduction="none").sum(-1)
    return {"nll": nll.numpy(), "tokens": np.full(len(seq), seq.size(1) - 1)}


def _base_weights(base_dir: str) -> str:
    """The base artifact's weights, checked against its manifest's sha256."""
    weights = os.path.join(base_dir, WEIGHTS)
    if sha256_file(weights) != read_json(base_dir, "manifest.json").get("weights_sha256"):
        raise ArtifactError(f"LoRA base {base_dir!r}: {WEIGHTS} does not match the sha256 in manifest.json")
    return weights
