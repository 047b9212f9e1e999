"""Export: consolidate a complete checkpoint's ZeRO shards into a registry artifact.

Stages 1-3 consolidate the fp32 master weights with DeepSpeed's own ``zero_to_fp32`` (it reads
DeepSpeed's pickled shard files; we only hand it files whose sha256 matched the rank markers).
Stage 0 keeps whole parameters in the module, which the checkpoint saved as safetensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from modelfleet import registry
from modelfleet.config import Config
from modelfleet.data.families import TRANSFORM_FILE
from modelfleet.families import build_model, get_family
from modelfleet.families.lora import base_of, write_adapter_dir
from modelfleet.models.lora import trainable_state
from modelfleet.storage import StorageLayout, sha256_file
from modelfleet.train import checkpoint as ck
from modelfleet.train import pickles

VERIFY_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


def consolidate(local_ckpt: str, zero_stage: int, *, adapter_only: bool = False) -> dict[str, Any]:
    """Full fp32 state dict from a local checkpoint directory (the adapter's tensors alone for a
    LoRA run: its checkpoints leave the frozen base out)."""
    import torch
    from safetensors.torch import load_file

    if zero_stage == 0:
        return load_file(os.path.join(local_ckpt, ck.ZERO0_WEIGHTS))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 narrates each file it reads (prints and progress bars): kept off the user's
    # screen, and shown if the consolidation fails.
    said = io.StringIO()
    try:
        with pickles.weights_only_loads(f"checkpoint {local_ckpt}"):  # files may change after the scan
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                sd = get_fp32_state_dict_from_zero_checkpoint(
                    local_ckpt, tag=ck.DS_TAG, exclude_frozen_parameters=adapter_only
                )
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    return {k: v.to(torch.float32) for k, v in sd.items()}


def export_checkpoint(
    c: ck.CheckpointInfo,
    *,
    run_name: str,
    name: str | None = None,
    storage_path: str | None = None,
    merge: bool = False,
) -> registry.ArtifactRef:
    """Validate, consolidate, verify against the live engine's probe logits, publish. A LoRA run
    publishes an adapter artifact, or with ``merge`` the base with the adapter folded in."""

    ck.validate(c.fs, c.uri)
    scratch = tempfile.mkdtemp(prefix="mf-export-")
    try:
        return _export(c, ck.download(c, scratch), run_name=run_name, name=name, storage_path=storage_path, merge=merge)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the downloaded checkpoint: a model-sized copy


def _export(
    c: ck.CheckpointInfo, local: str, *, run_name: str, name: str | None, storage_path: str | None, merge: bool
) -> registry.ArtifactRef:
    import torch
    from safetensors.torch import load_file

    with open(os.path.join(local, ck.TRAINER_STATE)) as f:
        tstate = json.load(f)
    cfg = Config.from_dict(tstate["config"])
    family = get_family(cfg.model.family)
    adapter_only = family.lora_params(cfg.model) is not None
    if merge and not adapter_only:
        raise ck.CheckpointError(
            f"--merge: run {run_name!r} trained every weight (no model.params.lora); there is no adapter to merge"
        )
    model = build_model(cfg.model)
    sd = _fill_tied(model, consolidate(local, cfg.deepspeed.zero_stage, adapter_only=adapter_only))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if adapter_only:  # the frozen base came from the base artifact; every adapter tensor must be here
        adapter = trainable_state(model)
        missing = [k for k in missing if k in adapter]
    if missing or unexpected:
        raise ck.CheckpointError(
            f"checkpoint {c.uri} does not match model config: missing {missing}, unexpected {unexpected}"
        )
    model.eval()
    verify_diff = None
    verify_path = os.path.join(local, ck.VERIFY_FILE)
    if os.path.isfile(verify_path):
        probe = load_file(verify_path)
        inputs = {k: v for k, v in probe.items() if k != "logits"}
        with torch.no_grad():
            logits = get_family(cfg.model.family).forward(model, inputs)
        verify_diff = float((logits.float() - probe["logits"]).abs().max())
        tol = VERIFY_TOLERANCE[cfg.train.precision]
        if verify_diff > tol:
            raise ck.CheckpointError(
                f"export of {c.uri}: consolidated logits differ from the live "
                f"engine's by {verify_diff:.3g} (> {tol}); not publishing"
            )
    name = registry.check_name(name or cfg.storage.model_name or cfg.preset)

    transform_path = os.path.join(local, TRANSFORM_FILE)
    transform = json.load(open(transform_path)) if os.path.isfile(transform_path) else None
    extra = {
        "run_id": run_name,
        "step": tstate["state"]["step"],
        "metrics": tstate.get("metrics", {}),
        "export_max_abs_logit_diff": verify_diff,
    }
    if adapter_only and not merge:
        out = write_adapter_dir(model, cfg, extra)
    elif adapter_only:
        merged_cfg = Config.from_dict(cfg.to_dict())
        merged_cfg.model.params = {k: v for k, v in cfg.model.params.items() if k != "lora"}
        out = write_artifact_dir(
            family.merged(model), merged_cfg, transform=transform, extra={**extra, "lora_base": base_of(cfg.model)}
        )
    else:
        out = write_artifact_dir(model, cfg, transform=transform, extra=extra)
    return registry.publish(storage_path or cfg.storage.path, name, out, consume=True)


def _fill_tied(model: Any, sd: dict[str, Any]) -> dict[str, Any]:
    """Tied parameters (embedding = lm_head) are stored once; give every alias its tensor."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for aliases in names.values():
        present = [a for a in aliases if a in sd]
        for a in aliases:
            if present and a not in sd:
                sd[a] = sd[present[0]]
    return sd


def write_artifact_dir(
    model: Any, cfg: Config, extra: dict[str, Any], *, transform: dict[str, Any] | None = None
) -> str:
    """A local directory in artifact layout for ``registry.publish`` (also used by tests and
    benchmarks that need an artifact without a training run). ``transform`` is the fitted
    preprocessing state of families other than gpt (saved as transform.json)."""
    from safetensors.torch import save_model

    out = tempfile.mkdtemp(prefix="mf-artifact-")
    weights = os.path.join(out, registry.WEIGHTS)
    save_model(model, weights)  # dedups the tied embedding / lm_head tensor
    dump_json(out, "config.json", cfg.model.__dict__)
    family = get_family(cfg.model.family)
    spec = family.write_preprocessor(out, cfg, transform)
    family.write_extra(model, cfg, out)
    dump_json(
        out,
        "manifest.json",
        {
            "format_version": 1,
            "family": cfg.model.family,
            "config": cfg.to_dict(),
            **spec,
            "weights_sha256": sha256_file(weights),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        },
    )
    return out


def dump_json(d: str, name: str, obj: Any) -> None:
    with open(os.path.join(d, name), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def export_run(
    storage_path: str, run_name: str, *, name: str | None = None, merge: bool = False
) -> registry.ArtifactRef:
    """``modelfleet export RUN``: the newest complete checkpoint of a run becomes an artifact."""
    root = StorageLayout(storage_path).runs()
    found, skipped = ck.latest_complete(root, run_name)
    if found is None:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise ck.CheckpointError(f"run {run_name!r} under {root} has no complete checkpoint{why}")
    return export_checkpoint(found, run_name=run_name, name=name, storage_path=storage_path, merge=merge)
