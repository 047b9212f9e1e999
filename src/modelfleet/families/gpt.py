"""The ``gpt`` family: the from-scratch byte-level GPT of ``models/gpt.py`` on prepared token rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from modelfleet.config import Config, ModelConfig
from modelfleet.data.prepare import check_seq_len, prepare_dataset
from modelfleet.data.tokenizer import ByteTokenizer, tokenizer_from_spec
from modelfleet.errors import ConfigError
from modelfleet.families.base import Family
from modelfleet.models.gpt import GPT
from modelfleet.storage import dump_json


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


class GPTFamily(TokenRows, Family):
    name = "gpt"
    task = "lm"
    primary_metric = "perplexity"
    serves_openai = True
    cache_epochs = False
    needs_ray_to_prepare = False

    def build(self, cfg: ModelConfig) -> Any:
        return GPT(cfg)

    def build_sharded(self, cfg: ModelConfig, ds_config: dict[str, Any]) -> Any:
        """Partitions from the start, then GPT-2's initialisation (tied ``lm_head`` included) run
        again one module at a time on gathered parameters: the weights equal a ZeRO-2 build's (the
        constructor's own pass wrote into empty partitions)."""
        import deepspeed

        model = super().build_sharded(cfg, ds_config)
        model.init_weights(gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
        return model

    def prepare(self, cfg: Config, *, overwrite: bool = False) -> dict[str, Any]:
        return prepare_dataset(cfg.data, cfg.model.block_size, ByteTokenizer(), overwrite=overwrite)

    def preflight(self, cfg: Config, meta: dict[str, Any]) -> None:
        check_seq_len(meta, cfg.model.block_size)
        if meta["tokenizer"]["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset's "
                              f"tokenizer vocabulary ({meta['tokenizer']['vocab_size']})")

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
