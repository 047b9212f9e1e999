"""Serve config, API schemas, auth and the batched generator, without Ray."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from modelfleet.config import ModelConfig, ServeConfig, parse_serve_config
from modelfleet.errors import ConfigError
from modelfleet.presets import load_config
from modelfleet.serve import auth
from modelfleet.serve import openai as oa
from modelfleet.serve.generation import Job, generate_steps

MODEL = {"name": "tiny", "artifact": "tiny@v1"}


@pytest.mark.parametrize(
    "models, key",
    [
        (
            [{**MODEL, "autoscaling": {"min_replicas": 3, "max_replicas": 2}}],
            "serve.models[0].autoscaling.min_replicas",
        ),
        (
            [{**MODEL, "autoscaling": {"min_replicas": 1, "initial_replicas": 5, "max_replicas": 2}}],
            "serve.models[0].autoscaling.initial_replicas",
        ),
        (
            [MODEL, {**MODEL, "name": "b", "autoscaling": {"max_replicas": 0}}],
            "serve.models[1].autoscaling.max_replicas",
        ),
        (
            [{**MODEL, "batching": {"max_batch_size": 32}, "max_ongoing_requests": 8}],
            "serve.models[0].max_ongoing_requests",
        ),
        ([{**MODEL, "ray_actor_options": {"num_gpus": 1.5}}], "serve.models[0].ray_actor_options.num_gpus"),
        ([{**MODEL, "autoscalling": {}}], "serve.models[0].autoscalling"),
        ([{**MODEL, "name": "bad name"}], "serve.models[0].name"),
        ([], "serve.models"),
    ],
)
def test_bad_values_name_their_key_path(models, key):
    with pytest.raises(ConfigError) as e:
        parse_serve_config({"models": models})
    assert str(e.value).startswith(f"{key}: "), str(e.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("route_prefix", "/a\n    use_backend evil"),
        ("route_prefix", "/a b"),
        ("app_name", "app\nbackend x"),
        ("app_name", "a b"),
        ("app_name", ""),
    ],
)
def test_names_that_would_land_in_haproxys_config_are_url_safe(field, value):
    """app_name and route_prefix are rendered verbatim into HAProxy's config: a newline would add
    a config line. They are refused naming the key."""
    with pytest.raises(ConfigError) as e:
        parse_serve_config({"models": [MODEL], field: value})
    assert str(e.value).startswith(f"serve.{field}: "), str(e.value)
    assert parse_serve_config({"models": [MODEL], "app_name": "my-app.v2_1", "route_prefix": "/v1/a~b"})


def test_valid_config_defaults_and_scale_to_zero():
    cfg = parse_serve_config(
        {
            "models": [
                {
                    **MODEL,
                    "autoscaling": {"min_replicas": 0, "max_replicas": 4},
                    "ray_actor_options": {"num_gpus": 0.25},
                }
            ]
        }
    )
    assert cfg.host == "127.0.0.1" and cfg.models[0].autoscaling.to_serve()["min_replicas"] == 0
    assert cfg.models[0].ray_actor_options.to_serve() == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert parse_serve_config(cfg.model_dump()) == cfg  # round-trips through the Serve args


def test_root_config_serve_section_is_validated(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "serve:\n  models:\n    - {name: tiny, artifact: tiny, autoscaling: {min_replicas: 2, max_replicas: 1}}\n"
    )
    with pytest.raises(ConfigError, match=r"^serve\.models\[0\]\.autoscaling\.min_replicas: must be <= max_replicas"):
        load_config(y)
    y.write_text("serve:\n  port: 8123\n  models: [{name: tiny, artifact: tiny}]\n")
    assert ServeConfig.model_validate(load_config(y).serve).port == 8123


def test_request_schemas():
    req = oa.CompletionRequest(prompt="hi", stop="\n")
    assert req.sampling().stop == ("\n",) and req.sampling().max_tokens is None
    assert oa.CompletionRequest(prompt="hi", stop=["s" * 256]).stop == ["s" * 256]
    with pytest.raises(ValidationError, match=r"stop\n.*at most 256 characters"):
        oa.CompletionRequest(prompt="hi", stop=["ok", "s" * 257])
    with pytest.raises(ValidationError, match="max_tokenz"):
        oa.CompletionRequest.model_validate({"prompt": "hi", "max_tokenz": 3})
    with pytest.raises(ValidationError):
        oa.CompletionRequest(prompt="hi", n=2)
    chat = oa.ChatCompletionRequest(
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert chat.prompt() == "### System:\nbe brief\n\n### User:\nhi\n\n### Assistant:\n"
    assert oa.CHAT_STOP in chat.sampling().stop


def test_auth(monkeypatch, tmp_path):
    monkeypatch.setenv("MF_TEST_KEY", "sk-1")
    cfg = parse_serve_config({"models": [MODEL], "api_key_env": "MF_TEST_KEY"})
    key = auth.load_api_key(cfg)
    assert auth.authorized("Bearer sk-1", key) and not auth.authorized("Bearer sk-2", key)
    assert not auth.authorized(None, key) and not auth.authorized("sk-1", key)
    assert auth.authorized(None, None)  # no key configured: open
    with pytest.raises(ConfigError, match="api_key_file"):
        auth.load_api_key(parse_serve_config({"models": [MODEL], "api_key_file": str(tmp_path / "absent")}))
    monkeypatch.delenv("MF_TEST_KEY")
    with pytest.raises(ConfigError, match="require_api_key") as e:
        auth.load_api_key(
            parse_serve_config({"models": [MODEL], "api_key_env": "MF_TEST_KEY", "require_api_key": True})
        )
    assert "sk-1" not in str(e.value)


def _model(block_size: int = 32):
    from modelfleet.families import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size)).eval()


def _text(ids):
    return bytes(i for i in ids if i < 256).decode("latin-1")


def _run(model, jobs):
    texts, tokens, reasons = [""] * len(jobs), [0] * len(jobs), [None] * len(jobs)
    for out in generate_steps(model, jobs, eos_id=256, decode=_text):
        for i, s in enumerate(out):
            if s is not None:
                texts[i] += s.text
                tokens[i] += s.tokens
                reasons[i] = s.finish_reason or reasons[i]
    return texts, tokens, reasons


@pytest.mark.parametrize("temperature, top_p", [(0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_batched_left_padded_generation_matches_each_request_alone_and_the_reference_decoder(temperature, top_p):
    from modelfleet.models.gpt import generate

    model = _model()
    prompts = [[10, 20, 30, 40, 50], [7], [1, 2, 3]]
    jobs = [
        Job(prompt_ids=p, max_tokens=6, temperature=temperature, top_p=top_p, seed=s) for s, p in enumerate(prompts)
    ]
    texts, tokens, reasons = _run(model, jobs)
    # Left padding and company change nothing: a seeded request samples the same text alone.
    assert texts == [_run(model, [j])[0][0] for j in jobs]
    for j, text, n, reason in zip(jobs, texts, tokens, reasons):
        # The reference decoder (unpadded, its own loop) draws through the same sampler with the
        # same seed, so it produces the same tokens, up to the end of text.
        ref = generate(
            model,
            torch.tensor([j.prompt_ids]),
            6,
            temperature=temperature,
            top_p=top_p,
            generator=torch.Generator().manual_seed(j.seed),
            eos_id=256,
        )[0, len(j.prompt_ids) :].tolist()
        ref = ref[: ref.index(256)] if 256 in ref else ref
        assert text == _text(ref) and n == len(ref)
        assert reason == ("stop" if len(ref) < 6 else "length")
    greedy = _run(model, [Job(prompt_ids=j.prompt_ids, max_tokens=6, temperature=0) for j in jobs])[0]
    assert (texts == greedy) == (temperature == 0)  # the sampled cases really sample


def test_rows_that_cannot_share_a_cache_are_grouped_and_seeds_are_per_row():
    model = _model(block_size=16)
    # Seeded: an unseeded row could sample the end-of-text token and stop short.
    long_prompt = Job(prompt_ids=list(range(1, 13)), max_tokens=4, seed=0)
    long_budget = Job(prompt_ids=[5], max_tokens=15, seed=0)
    _, tokens, reasons = _run(model, [long_prompt, long_budget])  # 12 + 15 > 16: would not fit one cache
    assert tokens == [4, 15] and reasons == ["length", "length"]
    a = _run(model, [Job(prompt_ids=[1, 2], max_tokens=8, seed=7)])[0]
    b = _run(model, [Job(prompt_ids=[9, 9, 9], max_tokens=5, seed=1), Job(prompt_ids=[1, 2], max_tokens=8, seed=7)])[0]
    assert a[0] == b[1]  # the same seeded request samples the same text whatever shares its batch


def test_stop_strings_end_the_row_and_are_not_returned():
    model = _model()
    full = _run(model, [Job(prompt_ids=[3, 4], max_tokens=10, temperature=0)])[0][0]
    stop = full[4:6]
    texts, _, reasons = _run(model, [Job(prompt_ids=[3, 4], max_tokens=10, temperature=0, stop=[stop])])
    assert texts[0] == full[: full.index(stop)] and reasons[0] == "stop"


@pytest.mark.parametrize("server", ["LMServer", "Predictor"])
def test_replicas_batch_as_their_spec_says_and_are_unhealthy_without_weights(server):
    from modelfleet.serve.model import LMServer
    from modelfleet.serve.predict import Predictor

    cls = {"LMServer": LMServer, "Predictor": Predictor}[server].func_or_class
    spec = {**MODEL, "batching": {"max_batch_size": 3, "batch_wait_timeout_s": 0.25}, "max_ongoing_requests": 3}
    replica = cls(spec, "/nonexistent")
    if server == "Predictor":  # language models batch continuously (tests/unit/test_engine.py)
        assert replica._batched._get_max_batch_size() == 3 and replica._batched._get_batch_wait_timeout_s() == 0.25
    with pytest.raises(RuntimeError, match="no weights loaded"):
        replica.check_health()  # Serve replaces a replica whose check fails
    with pytest.raises(RuntimeError, match="still loading"):
        replica.info()


def test_no_key_on_an_exposed_host_fails_closed():
    cfg = parse_serve_config({"models": [MODEL], "host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="serve.host: 0.0.0.0 is reachable.*--insecure-no-auth"):
        auth.check_exposure(cfg, None)
    auth.check_exposure(cfg, "sk-1")  # a key: fine
    auth.check_exposure(cfg.model_copy(update={"insecure_no_auth": True}), None)  # meant: fine
    auth.check_exposure(parse_serve_config({"models": [MODEL]}), None)  # loopback: fine
    assert auth.fingerprint("sk-1") != auth.fingerprint("sk-2") and "sk-1" not in auth.fingerprint("sk-1")
    assert auth.fingerprint(None) is None


def test_pool_variants_are_validated_and_unique_across_the_application():
    cfg = parse_serve_config(
        {
            "models": [
                {"name": "base", "artifact": "tiny@v1", "variants": {"a": "ft-a@v1"}},
                {"name": "other", "artifact": "x"},
            ]
        }
    )
    assert cfg.has_pools and cfg.models[0].variants == {"a": "ft-a@v1"} and cfg.models[1].variants is None
    assert cfg.models[0].max_models_per_replica == 8
    with pytest.raises(ConfigError, match=r"serve\.models: \[0\]\.variants: 'other' is already the name"):
        parse_serve_config(
            {
                "models": [
                    {"name": "base", "artifact": "b", "variants": {"other": "x"}},
                    {"name": "other", "artifact": "x"},
                ]
            }
        )
    with pytest.raises(ConfigError, match=r"serve\.models\[0\]\.variants: name 'a b' is invalid"):
        parse_serve_config({"models": [{"name": "base", "artifact": "b", "variants": {"a b": "x"}}]})
    with pytest.raises(ConfigError, match=r"serve\.models\[0\]\.max_models_per_replica"):
        parse_serve_config({"models": [{"name": "base", "artifact": "b", "variants": {}, "max_models_per_replica": 0}]})
    assert not parse_serve_config({"models": [{"name": "m", "artifact": "b"}]}).has_pools


def test_lora_params_are_checked_naming_their_key():
    from modelfleet.families import check_config

    ok = load_config(preset="tiny", overrides=["model.params.lora.base=tiny@v1", "model.params.lora.r=4"])
    assert check_config(ok).model.params["lora"]["r"] == 4
    for bad, match in (
        (["model.params.lora.r=0"], r"model\.params\.lora\.r: must be >= 1"),
        (["model.params.lora.rank=4"], r"model\.params\.lora\.rank: unknown key"),
        ([], r"model\.params\.lora\.base: is empty"),
    ):
        with pytest.raises(ConfigError, match=match):
            check_config(load_config(preset="tiny", overrides=["model.params.lora.alpha=8", *bad]))


def test_lora_sections_load_from_yaml_for_either_language_family(tmp_path):
    import yaml

    gpt = tmp_path / "gpt.yaml"
    gpt.write_text(yaml.safe_dump({"preset": "tiny", "model": {"params": {"lora": {"base": "tiny@v1", "r": 4}}}}))
    assert load_config(gpt).model.params["lora"] == {"base": "tiny@v1", "r": 4}
    # A preset of another family: its params are replaced, and the hf family checks the new ones.
    hf = tmp_path / "hf.yaml"
    hf.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "model": {
                    "family": "hf-causal-lm",
                    "params": {
                        "path": str(tmp_path),
                        "block_size": 32,
                        "lora": {"base": "hf-base@v2", "target_modules": ["c_attn"]},
                    },
                },
            }
        )
    )
    cfg = load_config(hf, overrides=["model.params.lora.alpha=32"])
    assert cfg.model.params["lora"] == {"base": "hf-base@v2", "target_modules": ["c_attn"], "alpha": 32}
    hf.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "model": {
                    "family": "hf-causal-lm",
                    "params": {"path": str(tmp_path), "lora": {"base": "b", "rank": 4}},
                },
            }
        )
    )
    with pytest.raises(ConfigError, match=r"model\.params\.lora\.rank: unknown key"):
        load_config(hf)
