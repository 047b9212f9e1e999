"""LoRA for the language-model families (``gpt``, ``hf-causal-lm``): ``model.params.lora`` turns
training into adapter-only fine-tuning over a frozen base artifact, and export writes an
*adapter artifact* (peft's ``adapter_model.safetensors`` + ``adapter_config.json``, our config,
tokenizer and a manifest naming the base artifact and its sha256) instead of a full model.

A family mixes in ``LoraHooks`` and says where peft wraps (``peft_root``/``set_peft_root``: the
whole ``GPT``, or the ``transformers`` model inside ``HFCausalLM`` so the adapter's tensor names
are the ones peft and transformers use for that model on their own).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, ClassVar

from torch import nn

from modelfleet import registry
from modelfleet.config import Config, ModelConfig
from modelfleet.errors import ArtifactError, ConfigError
from modelfleet.families import get_family
from modelfleet.models import lora
from modelfleet.storage import dump_json, sha256_file

KIND_ADAPTER = "adapter"
"""``manifest.json`` ``kind`` of an adapter artifact (a full model has ``model``, or no kind)."""


class LoraHooks:
    """What a language-model family adds for LoRA (mixed in before ``Family``)."""

    lora_targets: ClassVar[list[str] | None] = None
    """Default ``target_modules`` (None: peft's default for the architecture)."""

    def lora_params(self, cfg: ModelConfig) -> lora.LoraParams | None:
        return self.parse_params(cfg.params).lora  # type: ignore[attr-defined]

    def peft_root(self, model: nn.Module) -> nn.Module:
        """The module peft wraps (the whole model by default)."""
        return model

    def set_peft_root(self, model: nn.Module, root: nn.Module) -> nn.Module:
        """``model`` with its peft root replaced by ``root``; returns the model to use."""
        return root

    def build_base(self, cfg: ModelConfig, base_dir: str) -> nn.Module:
        """The base artifact's model with its weights (``base_dir`` is a local copy)."""
        raise NotImplementedError

    def with_lora(self, model: nn.Module, p: lora.LoraParams) -> nn.Module:
        """``model`` with a fresh adapter on its target layers; only the adapter trains."""
        return self.set_peft_root(model, lora.wrap(self.peft_root(model), p, self.lora_targets))

    def merged(self, model: nn.Module) -> nn.Module:
        """The adapter folded into the base weights: a plain model of the family."""
        return self.set_peft_root(model, self.peft_root(model).merge_and_unload())

    def resolve_lora_base(self, cfg: Config) -> None:
        """Pin ``lora.base`` to one artifact version (a URI the workers and export read) and
        check it is a full model of this family."""
        p = self.lora_params(cfg.model)
        if p is None:
            return
        try:
            ref = registry.resolve(cfg.storage.path, p.base)
        except ArtifactError as e:
            raise ConfigError(f"model.params.lora.base: {e}") from None
        manifest = registry.read_json(ref.uri, "manifest.json")
        if manifest.get("kind", "model") != "model" or manifest.get("family") != cfg.model.family:
            raise ConfigError(
                f"model.params.lora.base: {p.base!r} is a {manifest.get('family')} "
                f"{manifest.get('kind', 'model')} artifact; the base must be a full "
                f"{cfg.model.family} model"
            )
        cfg.model.params["lora"] = {
            **cfg.model.params["lora"],
            "base": ref.uri,
            "base_ref": f"{ref.name}@{ref.version}" if ref.name else ref.uri,
            "base_sha256": manifest["weights_sha256"],
        }


def base_of(cfg: ModelConfig) -> dict[str, Any]:
    """What training pinned as the adapter's base (``resolve_lora_base``)."""
    p = cfg.params["lora"]
    return {"ref": p.get("base_ref") or p["base"], "uri": p["base"], "weights_sha256": p.get("base_sha256", "")}


def write_adapter_dir(model: nn.Module, cfg: Config, extra: dict[str, Any]) -> str:
    """A local directory in adapter-artifact layout for ``registry.publish``."""
    family = get_family(cfg.model.family)
    out = tempfile.mkdtemp(prefix="mf-adapter-")
    family.peft_root(model).save_pretrained(out, safe_serialization=True)
    weights = os.path.join(out, lora.ADAPTER_WEIGHTS)
    dump_json(out, "config.json", cfg.model.__dict__)
    spec = family.write_preprocessor(out, cfg, None)
    dump_json(
        out,
        "manifest.json",
        {
            "format_version": 1,
            "kind": KIND_ADAPTER,
            "family": cfg.model.family,
            "config": cfg.to_dict(),
            **spec,
            "weights_file": lora.ADAPTER_WEIGHTS,
            "weights_sha256": sha256_file(weights),
            # peft applies whatever adapter_config.json asks: it is hashed like the weights.
            "adapter_config_sha256": sha256_file(os.path.join(out, lora.ADAPTER_CONFIG)),
            "adapter_bytes": os.path.getsize(weights),
            "base": base_of(cfg.model),
            "lora": cfg.model.params["lora"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        },
    )
    return out


def check_adapter(local: str, uri: str, manifest: dict[str, Any]) -> str:
    """The adapter's weights file, checked against the manifest's sha256."""
    weights = os.path.join(local, lora.ADAPTER_WEIGHTS)
    if not os.path.isfile(weights) or not os.path.isfile(os.path.join(local, lora.ADAPTER_CONFIG)):
        raise ArtifactError(f"adapter artifact {uri!r} lacks {lora.ADAPTER_WEIGHTS} or {lora.ADAPTER_CONFIG}")
    if sha256_file(weights) != manifest.get("weights_sha256"):
        raise ArtifactError(
            f"adapter artifact {uri!r}: {lora.ADAPTER_WEIGHTS} does not match the sha256 in manifest.json"
        )
    conf_path = os.path.join(local, lora.ADAPTER_CONFIG)
    if sha256_file(conf_path) != manifest.get("adapter_config_sha256"):
        raise ArtifactError(
            f"adapter artifact {uri!r}: {lora.ADAPTER_CONFIG} does not match adapter_config_sha256 in "
            "manifest.json (re-export the adapter to record it)"
        )
    try:
        family = get_family(str(manifest.get("family")))
        lora.check_adapter_config(_read_json(conf_path), getattr(family, "lora_targets", None), uri)
    except (ConfigError, ValueError) as e:
        raise ArtifactError(str(e)) from None
    return weights


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        conf = json.load(f)
    if not isinstance(conf, dict):
        raise ValueError(f"{lora.ADAPTER_CONFIG} is a JSON {type(conf).__name__}, not an object")
    return conf


def adapter_base(manifest: dict[str, Any], uri: str) -> dict[str, Any]:
    base = manifest.get("base") or {}
    if not base.get("uri"):
        raise ArtifactError(f"adapter artifact {uri!r}: manifest.json names no base artifact")
    return base


def check_base(base_manifest: dict[str, Any], base: dict[str, Any], uri: str) -> None:
    """The base an adapter is put on must be the weights it was trained over."""
    want = base.get("weights_sha256")
    if not want:
        raise ArtifactError(f"adapter {uri!r}: manifest.json names no base weights_sha256; re-export the adapter")
    if base_manifest.get("weights_sha256") != want:
        raise ArtifactError(
            f"adapter {uri!r} was trained over base weights sha256 {want[:12]}..., but "
            f"{base.get('ref', base['uri'])!r} has {str(base_manifest.get('weights_sha256'))[:12]}..."
        )


def check_variant(manifest: dict[str, Any], base_manifest: dict[str, Any], artifact: str) -> None:
    """A pool's variant must be a LoRA adapter trained over exactly the pool's base weights."""
    if manifest.get("kind") != KIND_ADAPTER:
        raise ArtifactError(
            f"variant artifact {artifact!r} is a full model, not a LoRA adapter; serve it as its own model"
        )
    check_base(base_manifest, adapter_base(manifest, artifact), artifact)
