"""LoRA through the real Ray Train + DeepSpeed loop: a tiny GPT base trained on Python code, then
an adapter trained with ZeRO-3 (the frozen base sharded too) on a corpus that ships with Python
(the cp125x code-page tables, ``stdlib:encodings/cp125*.py``), stopped at step 20 and resumed to
40 from its adapter-only checkpoint; the exported adapter artifact loads in ``peft`` with equal
logits, ``export --merge`` equals base + adapter, and the adapter lowers the base's perplexity on
that corpus's held-out split by at least 20% (measured with ``modelfleet evaluate``'s code).

The base is the session's ZeRO-3 stage run (``stage_runs``, tests/conftest.py: tiny preset, 30
steps, exported), published again into this module's registry as ``base``, as ``export`` publishes
a staged artifact: training the same base here would cost one more fit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import peft  # noqa: F401  the dev extra installs it: a broken install must fail here, not skip
import pytest
import torch

from helpers import read_records, tiny_config

ADAPTER_SOURCES = ["stdlib:encodings/cp125*.py"]
LORA = {"base": "base", "r": 8, "alpha": 16}


@pytest.fixture(scope="module")
def lora_run(stage_runs, tmp_path_factory):
    import shutil

    from modelfleet import registry
    from modelfleet.config import DataConfig
    from modelfleet.data.prepare import prepare_dataset
    from modelfleet.data.tokenizer import ByteTokenizer
    from modelfleet.train.trainer import train

    storage = tmp_path_factory.mktemp("lora-storage")
    corpus = str(storage / "cp-data")
    prepare_dataset(DataConfig(sources=ADAPTER_SOURCES, path=corpus), 128, ByteTokenizer())
    base = stage_runs[1][3][1]  # ZeRO-3, 30 steps: what `tiny_config` with the preset's stage trains
    staged = storage / "base-staged"  # publish rewrites the staged manifest: never the shared run's
    shutil.copytree(base.artifact.uri, staged)
    registry.publish(str(storage), "base", str(staged))
    shutil.rmtree(staged)

    def adapter_config(steps: int):
        cfg = tiny_config(
            storage,
            corpus,
            [
                "storage.run_name=cp",
                "storage.model_name=cp",
                "deepspeed.zero_stage=3",
                f"train.max_steps={steps}",
                "train.lr=0.003",
                "train.warmup_steps=2",
            ],
        )
        cfg.model.params = {"lora": dict(LORA)}
        return cfg

    first = train(adapter_config(20), export=False, show_progress=False)
    resumed = train(adapter_config(40), resume="cp", show_progress=False)
    return SimpleNamespace(storage=storage, corpus=corpus, base=base, first=first, resumed=resumed)


def test_adapter_only_checkpoints_and_resume(lora_run):
    run_dir = Path(lora_run.resumed.run_dir)
    records = read_records(run_dir)
    resumes = [r for r in records if r.get("kind") == "resume"]
    assert resumes and resumes[-1]["step"] == 20
    assert lora_run.resumed.checkpoint_step == 40

    # An adapter checkpoint holds the adapter (and its optimizer state), not the frozen base:
    # far smaller than the base run's checkpoint of the same model.
    def size(d: Path) -> int:
        return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())

    base_ckpt = max(Path(lora_run.base.run_dir).glob("step_*"))
    adapter_ckpt = max(run_dir.glob("step_*"))
    assert size(adapter_ckpt) < size(base_ckpt) / 5, (size(adapter_ckpt), size(base_ckpt))


def test_adapter_artifact_loads_in_peft_with_equal_logits_and_merges(lora_run):
    from peft import PeftModel
    from safetensors.torch import load_model

    from modelfleet import registry
    from modelfleet.config import ModelConfig
    from modelfleet.families.artifact import load_artifact
    from modelfleet.models.gpt import GPT
    from modelfleet.train.export import export_run

    ref = lora_run.resumed.artifact
    manifest = registry.read_json(ref.uri, "manifest.json")
    base = registry.resolve(str(lora_run.storage), "base")
    assert manifest["kind"] == "adapter" and manifest["base"]["ref"] == f"base@{base.version}"
    assert manifest["base"]["weights_sha256"] == registry.read_json(base.uri, "manifest.json")["weights_sha256"]
    assert not Path(ref.uri, "model.safetensors").exists() and manifest["adapter_bytes"] < 200_000

    ids = torch.tensor([list(b"class Codec(codecs.Codec):\n    def encode(self")])
    ours, _, _ = load_artifact(ref.uri)
    plain = GPT(ModelConfig(**json.loads(Path(base.uri, "config.json").read_text())))
    load_model(plain, str(Path(base.uri, "model.safetensors")))
    with torch.no_grad():
        base_logits = plain(ids)
        theirs = PeftModel.from_pretrained(plain, ref.uri).eval()  # peft alone reads the artifact
        want, got = theirs(ids), ours(ids)
    assert (want - got).abs().max().item() == 0.0
    assert (want - base_logits).abs().max().item() > 1e-3  # the adapter changes the model

    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="export-scratch-"))
    tempfile.tempdir = str(scratch)  # export's own temp directories land here, nowhere else
    try:
        merged_ref = export_run(str(lora_run.storage), "cp", name="cp-merged", merge=True)
    finally:
        tempfile.tempdir = None
    assert list(scratch.iterdir()) == []  # the downloaded checkpoint and the staged artifact are gone
    merged, _, merged_manifest = load_artifact(merged_ref.uri)
    assert (
        merged_manifest.get("kind", "model") == "model" and "lora" not in merged_manifest["config"]["model"]["params"]
    )
    with torch.no_grad():
        assert (merged(ids) - got).abs().max().item() <= 1e-5


def test_adapter_lowers_the_bases_perplexity_on_its_corpus_by_20_percent(lora_run):
    from modelfleet import registry
    from modelfleet.evaluate import evaluate_artifact

    ppl = {}
    for name in ("base", "cp"):
        uri = registry.resolve(str(lora_run.storage), name).uri
        ppl[name] = evaluate_artifact(uri, lora_run.corpus, split="test", concurrency=1)["metrics"]["perplexity"]
    drop = 1 - ppl["cp"] / ppl["base"]
    print(f"held-out perplexity: base {ppl['base']:.2f}, base + adapter {ppl['cp']:.2f} ({100 * drop:.1f}% lower)")
    assert np.isfinite(ppl["cp"]) and drop >= 0.20, ppl
