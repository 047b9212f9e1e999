"""Loading an artifact: the family named in its config builds the model, the weights come from
safetensors checked against the manifest's sha256 (loading never unpickles), and the family
loads the preprocessor saved beside them. An adapter artifact (``kind: adapter``) loads its base
artifact first, checks the base's sha256 is the one the adapter was trained over, and puts the
adapter on it with peft."""

from __future__ import annotations

import os
from typing import Any

from modelfleet.config import ModelConfig
from modelfleet.errors import ArtifactError
from modelfleet.families import get_family
from modelfleet.families.lora import KIND_ADAPTER, adapter_base, check_adapter, check_base
from modelfleet.models import lora
from modelfleet.registry import WEIGHTS, fetch
from modelfleet.storage import read_json, sha256_file


def load_artifact(uri: str, *, device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, preprocessor, manifest) from an artifact dir; checks the weights'
    sha256. The preprocessor is what the family turns raw input with: the tokenizer of a
    language model, the fitted ``Transform`` of the other families."""
    from safetensors.torch import load_model

    local = fetch(uri)
    manifest = read_json(local, "manifest.json")
    if manifest.get("kind") == KIND_ADAPTER:
        return _load_adapter(uri, local, manifest, device)
    weights = os.path.join(local, WEIGHTS)
    if not os.path.isfile(weights):
        raise ArtifactError(f"artifact {uri!r} has no {WEIGHTS}")
    if sha256_file(weights) != manifest.get("weights_sha256"):
        raise ArtifactError(f"artifact {uri!r}: {WEIGHTS} does not match the sha256 in manifest.json")
    mcfg = ModelConfig(**read_json(local, "config.json"))
    family = get_family(mcfg.family)
    model = family.build_for_artifact(mcfg, local)
    load_model(model, weights, device=device)
    return model.eval(), family.load_preprocessor(local, manifest), manifest


def load_preprocessor(uri: str) -> tuple[Any, dict[str, Any]]:
    """(preprocessor, manifest) of an artifact, without its weights: what a replica whose engine
    runs in another process needs (an LM's tokenizer)."""
    local = fetch(uri)
    manifest = read_json(local, "manifest.json")
    if manifest.get("kind") == KIND_ADAPTER:
        return get_family(manifest["family"]).load_preprocessor(local, manifest), manifest
    mcfg = ModelConfig(**read_json(local, "config.json"))
    return get_family(mcfg.family).load_preprocessor(local, manifest), manifest


def _load_adapter(uri: str, local: str, manifest: dict[str, Any], device: str) -> tuple[Any, Any, dict[str, Any]]:
    check_adapter(local, uri, manifest)
    base = adapter_base(manifest, uri)
    model, _, base_manifest = load_artifact(base["uri"], device=device)
    check_base(base_manifest, base, uri)
    family = get_family(manifest["family"])
    model = family.set_peft_root(model, lora.peft().PeftModel.from_pretrained(family.peft_root(model), local))
    return model.eval(), family.load_preprocessor(local, manifest), manifest
