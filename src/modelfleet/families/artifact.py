"""Loading an artifact: the family named in its config builds the model, the weights come from
safetensors checked against the manifest's sha256 (loading never unpickles), and the family
loads the preprocessor saved beside them."""

from __future__ import annotations

import os
from typing import Any

from modelfleet.config import ModelConfig
from modelfleet.errors import ArtifactError
from modelfleet.families import get_family
from modelfleet.registry import WEIGHTS, fetch
from modelfleet.storage import read_json, sha256_file


def load_artifact(uri: str, *, device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, preprocessor, manifest) from an artifact dir; checks the weights'
    sha256. The preprocessor is what the family turns raw input with: the tokenizer of a
    language model, the fitted ``Transform`` of the other families."""
    from safetensors.torch import load_model

    local = fetch(uri)
    manifest = read_json(local, "manifest.json")
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
