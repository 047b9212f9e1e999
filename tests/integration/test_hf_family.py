"""``hf-causal-lm``: tiny random GPT-2 and Llama models built with ``from_config`` and saved with
``save_pretrained`` (nothing downloaded), a byte-level BPE tokenizer trained here. Logits match
transformers' own forward within 1e-4 before and after our export; GPT-2 fine-tunes with ZeRO-3
on 2 workers and is served through the OpenAI-compatible API over HTTP (port 8250)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import transformers  # the dev extra installs it: a broken install must fail here, not skip

from helpers import TEST_SOURCES, serve_on
from modelfleet.families.artifact import load_artifact

PORT = 8250
PROBE = "def loads(s, *, cls=None):"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    eos = tok.eos_token_id
    configs = {
        "gpt2": transformers.GPT2Config(
            vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=eos, eos_token_id=eos
        ),
        "llama": transformers.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=eos,
            eos_token_id=eos,
        ),
    }
    out = {}
    for arch, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[arch] = str(d)
    return out


def _hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(path: str) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return torch.tensor([tok.encode(PROBE)])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_match_transformers_before_and_after_export(hf_dirs, arch, tmp_path):
    from modelfleet import registry
    from modelfleet.config import Config, ModelConfig, StorageConfig
    from modelfleet.families import build_model
    from modelfleet.train.export import write_artifact_dir

    path = hf_dirs[arch]
    ids = _ids(path)
    reference = _hf_logits(path, ids)
    cfg = Config(
        model=ModelConfig(family="hf-causal-lm", params={"path": path, "block_size": 32}),
        storage=StorageConfig(path=str(tmp_path)),
    )
    ours = build_model(cfg.model).eval()
    with torch.no_grad():
        before = ours(ids)
    assert (before - reference).abs().max().item() <= 1e-4
    ref = registry.publish(str(tmp_path), f"hf-{arch}", write_artifact_dir(ours, cfg, {}), consume=True)
    loaded, tok, manifest = load_artifact(ref.uri)
    with torch.no_grad():
        after = loaded(ids)
    assert manifest["family"] == "hf-causal-lm" and manifest["hf_format"] == "hf"
    assert (after - reference).abs().max().item() <= 1e-4
    # The Hugging Face copy in the artifact loads with transformers alone.
    assert (_hf_logits(str(Path(ref.uri, "hf")), ids) - reference).abs().max().item() <= 1e-4
    assert tok.decode(tok.encode(PROBE)) == PROBE


@pytest.fixture(scope="module")
def finetuned(ray_session, hf_dirs, tmp_path_factory):
    """GPT-2 fine-tuned with ZeRO-3 through the commands a user types, from a YAML config
    (`modelfleet prepare` printed its summary with a KeyError once for this family)."""
    import yaml

    from modelfleet import registry
    from modelfleet.cli import main
    from modelfleet.presets import load_config
    from modelfleet.storage import StorageLayout

    storage = tmp_path_factory.mktemp("hf-storage")
    config = storage / "hf.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "model": {"family": "hf-causal-lm", "params": {"path": hf_dirs["gpt2"], "block_size": 32}},
                "data": {"sources": TEST_SOURCES},
                "storage": {"path": str(storage), "run_name": "hf-gpt2", "model_name": "hf-gpt2"},
                "deepspeed": {"zero_stage": 3},
                "train": {
                    "max_steps": 24,
                    "eval_every": 12,
                    "checkpoint_every": 0,
                    "eval_batches": 2,
                    "lr": 0.003,
                    "warmup_steps": 2,
                    "micro_batch_size": 8,
                },
            }
        )
    )
    assert main(["prepare", str(config)]) == 0
    assert main(["train", str(config)]) == 0
    run = SimpleNamespace(
        run_dir=StorageLayout(str(storage)).run("hf-gpt2"), artifact=registry.resolve(str(storage), "hf-gpt2")
    )
    return load_config(config), run


def test_gpt2_fine_tunes_with_zero3_and_exports_hf_format(finetuned, hf_dirs):
    from modelfleet.evaluate import evaluate_artifact

    cfg, res = finetuned
    evals = [json.loads(x) for x in Path(res.run_dir, "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in evals if r["kind"] == "eval"]
    assert len(evals) == 2 and evals[-1] < evals[0], evals
    art = Path(res.artifact.uri)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["config"]["deepspeed"]["zero_stage"] == 3
    assert manifest["export_max_abs_logit_diff"] <= 1e-4  # consolidated ZeRO-3 shards == live engine
    for f in ("hf/model.safetensors", "hf/config.json", "hf/tokenizer.json", "model.safetensors"):
        assert (art / f).is_file(), f
    ids = _ids(hf_dirs["gpt2"])
    model, _, _ = load_artifact(res.artifact.uri)
    with torch.no_grad():
        ours = model(ids)
    assert (_hf_logits(str(art / "hf"), ids) - ours).abs().max().item() <= 1e-4
    assert (_hf_logits(hf_dirs["gpt2"], ids) - ours).abs().max().item() > 1e-3  # fine-tuning changed it
    m = evaluate_artifact(res.artifact.uri, cfg.data.path)["metrics"]
    assert m["perplexity"] < 400 / 2, m  # well below the uniform guess over the 400-token vocabulary


@pytest.fixture(scope="module")
def hf_lora(finetuned):
    """A LoRA adapter (peft's default targets for GPT-2) trained with ZeRO-2 over the fine-tuned
    artifact ``hf-gpt2`` as its frozen base, exported as an adapter artifact."""
    from modelfleet.presets import load_config
    from modelfleet.train.trainer import train

    cfg, _ = finetuned
    lcfg = load_config(
        preset="tiny",
        overrides=[
            f"storage.path={cfg.storage.path}",
            f"data.path={cfg.data.path}",
            "storage.run_name=hf-lora",
            "storage.model_name=hf-lora",
            "deepspeed.zero_stage=2",
            "train.max_steps=8",
            "train.eval_every=8",
            "train.checkpoint_every=0",
            "train.eval_batches=2",
            "train.micro_batch_size=8",
            "train.lr=0.01",
        ],
    )
    lcfg.model = type(cfg.model)(
        family="hf-causal-lm", params={**cfg.model.params, "lora": {"base": "hf-gpt2", "r": 4}}
    )
    return train(lcfg, show_progress=False)


def test_hf_lora_adapter_loads_in_peft_over_transformers_with_equal_logits(hf_lora, finetuned):
    from peft import PeftModel

    from modelfleet import registry

    cfg, res = finetuned
    art = Path(hf_lora.artifact.uri)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["base"]["ref"] == f"hf-gpt2@{res.artifact.version}"
    assert json.loads((art / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]
    ids = _ids(str(Path(res.artifact.uri, "hf")))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(Path(res.artifact.uri, "hf")), dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, str(art)).eval()(input_ids=ids).logits
        ours = load_artifact(str(art))[0](ids)
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert (theirs - before).abs().max().item() > 1e-4  # the adapter trained
    assert registry.resolve(cfg.storage.path, "hf-lora").uri == str(art)


def test_finetuned_model_serves_openai_completions_with_its_tokenizer(finetuned, hf_lora):
    """The fine-tuned model served as a pool whose variant ``gpt2-lora`` is the adapter over it:
    the base and the variant each answer as transformers (+ peft) generate greedily."""
    from peft import PeftModel

    from modelfleet.serve.operations import deploy

    cfg, res = finetuned
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(res.artifact.uri, "hf"))).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(Path(res.artifact.uri, "hf")))
    ids = torch.tensor([tok.encode(PROBE)])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    expected = tok.decode(ref[0, ids.size(1) :], skip_special_tokens=True)
    with torch.no_grad():
        lora = PeftModel.from_pretrained(hf, hf_lora.artifact.uri).eval()
        ref = lora.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    expected_lora = tok.decode(ref[0, ids.size(1) :], skip_special_tokens=True)
    with serve_on(PORT):
        deploy(
            {
                "app_name": "hf",
                "route_prefix": "/hf",
                "port": PORT,
                "storage_path": cfg.storage.path,
                "ingress": {"num_cpus": 0.05},
                "models": [
                    {
                        "name": "gpt2-ft",
                        "artifact": "hf-gpt2",
                        "ray_actor_options": {"num_cpus": 0.5},
                        "variants": {"gpt2-lora": "hf-lora"},
                    }
                ],
            }
        )
        with httpx.Client(timeout=120) as c:
            r = c.post(
                f"http://127.0.0.1:{PORT}/hf/v1/completions",
                json={"model": "gpt2-lora", "prompt": PROBE, "max_tokens": 8, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected_lora
            r = c.post(
                f"http://127.0.0.1:{PORT}/hf/v1/completions",
                json={"model": "gpt2-ft", "prompt": PROBE, "max_tokens": 8, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["text"] == expected  # greedy: same as transformers' generate
            assert body["usage"]["prompt_tokens"] == ids.size(1)  # counted with the model's tokenizer
            r = c.post(f"http://127.0.0.1:{PORT}/hf/v1/models/gpt2-ft/predict", json={"instances": [{}]})
            assert r.status_code == 400 and "completions" in r.json()["error"]["message"]
