"""The nn.Modules of every family (no data, training or serving code: that is ``families/``)."""

from modelfleet.models.gpt import GPT, KVCache, flops_per_token, generate, num_params

__all__ = ["GPT", "KVCache", "flops_per_token", "generate", "num_params"]
