"""Where a replica or evaluation actor runs its model, and in which dtype."""

from __future__ import annotations

import pytest
import torch

from modelfleet.config import ModelConfig
from modelfleet.config.serve import parse_serve_config
from modelfleet.errors import ConfigError
from modelfleet.models.placement import OnDevice, place, placement
from modelfleet.serve.engine import Engine, EngineConfig
from modelfleet.serve.generation import Job


def test_cpu_replicas_stay_on_cpu_in_float32_and_gpu_ones_default_to_bf16():
    cpu = placement(0, "auto", cuda_available=True, simulated=False, who="m")
    assert (cpu.device.type, cpu.dtype, cpu.problem) == ("cpu", torch.float32, None)
    assert cpu.describe() == {"device": "cpu", "dtype": "float32"}
    sim = placement(1, "auto", cuda_available=False, simulated=True, who="m")  # logical GPU: exempt
    assert (sim.device.type, sim.dtype, sim.problem) == ("cpu", torch.float32, None)
    assert placement(0, "bfloat16", cuda_available=False, simulated=False, who="m").dtype == torch.bfloat16


def test_a_reserved_gpu_without_usable_cuda_is_a_problem_named_for_the_replica():
    broken = placement(1, "auto", cuda_available=False, simulated=False, who="model tiny's replica")
    assert broken.device.type == "cpu"
    assert broken.problem and "model tiny's replica reserves num_gpus=1" in broken.problem
    assert "CUDA is unusable" in broken.problem and "num_gpus: 0" in broken.problem


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench/gpu/run.sh checks it on the device)")
def test_a_gpu_replica_runs_on_its_gpu_in_bf16():
    where = placement(1, "auto", cuda_available=True, simulated=False, who="m")
    assert where.device.type == "cuda" and where.dtype == torch.bfloat16


def test_dtype_is_validated_at_config_load():
    model = {"name": "tiny", "artifact": "tiny"}
    assert parse_serve_config({"models": [{**model, "dtype": "bfloat16"}]}).models[0].dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"serve.models\[0\].dtype: .*'fp8'"):
        parse_serve_config({"models": [{**model, "dtype": "fp8"}]})


def test_placing_moves_the_parameters_and_on_device_returns_cpu_float32():
    net = torch.nn.Linear(4, 2)
    where = placement(0, "bfloat16", cuda_available=False, simulated=False, who="m")
    wrapped = OnDevice(place(net, where), where)
    assert net.weight.dtype == torch.bfloat16  # moved, not merely loaded "onto" a device
    out = wrapped(torch.ones(3, 4))
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (3, 2)


def test_the_engine_decodes_a_bf16_model():
    from modelfleet.families import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    place(model, placement(0, "bfloat16", cuda_available=False, simulated=False, who="m"))
    engine = Engine(
        model,
        eos_id=256,
        decode=lambda ids: bytes(i for i in ids if i < 256).decode("latin-1"),
        config=EngineConfig(max_num_seqs=2),
    )
    assert engine.cache.k.dtype == torch.bfloat16
    seqs = [
        engine.add(Job(prompt_ids=[1, 2, 3], max_tokens=5, temperature=0)),
        engine.add(Job(prompt_ids=[9], max_tokens=4, temperature=0.7, seed=1)),
    ]
    while engine.has_work:
        engine.step()
    assert [s.produced for s in seqs] == [5, 4] or any(s.row.finish_reason == "stop" for s in seqs)
