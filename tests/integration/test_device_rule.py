"""The worker loop's device rule, made visible on CPU: collectives refuse a tensor that is not on
the engine's device, and our code reads nothing back to the host between log steps.

A real DeepSpeed engine (one rank, gloo) runs the loop's own ``micro_step`` and ``LossMeter`` in
a subprocess (torch.distributed state must not leak into the test session)."""

from __future__ import annotations

from helpers import run_single_rank

BODY = r"""
import numpy as np
from modelfleet.families import build_model, get_family
from modelfleet.presets import load_config
from modelfleet.train import collectives, engine_ops
from modelfleet.train.deepspeed import build_ds_config, lr_lambda

SRC = os.path.dirname(engine_ops.__file__).rsplit("/train", 1)[0]
calls = []
def counting(name, original):
    def wrapper(self, *a, **kw):
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(SRC) and not caller.endswith("collectives.py"):
            calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
        return original(self, *a, **kw)
    return wrapper
for name in ("item", "tolist", "cpu", "__float__", "numpy"):
    setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

stage = int(sys.argv[1])
cfg = load_config(preset="tiny", overrides=["train.num_workers=1", "train.micro_batch_size=2", "train.grad_accum=2",
                                            f"deepspeed.zero_stage={stage}", "model.n_layer=1", "model.block_size=16"])
torch.manual_seed(0)
model = build_model(cfg.model)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=build_ds_config(cfg),
                                  lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)))
family = get_family("gpt")
rng = np.random.default_rng(0)
meter = collectives.LossMeter(engine.device, 1)
steps, losses = 3, []
for step in range(steps):
    for _ in range(cfg.train.grad_accum):
        engine_ops.micro_step(engine, family, {"tokens": rng.integers(0, 256, (2, 17))}, meter)
    losses.append(meter.reduce())
syncs_between_logs = list(calls)
reads_between_logs = collectives.HOST_READS["count"]
values = [collectives.to_host(l) for l in losses]  # what a log step does
refused = ""
try:
    collectives.all_reduce(torch.zeros(1, device="meta"), engine.device)
except RuntimeError as e:
    refused = str(e)
print("RESULT " + json.dumps({"syncs": syncs_between_logs, "reads": reads_between_logs,
                              "reads_after": collectives.HOST_READS["count"], "values": values,
                              "refused": refused, "device": str(engine.device)}))
"""


def test_no_host_sync_between_log_steps_and_collectives_stay_on_the_engine_device():
    for stage in (2, 3):
        out = run_single_rank(BODY, str(stage))
        # Three optimizer steps of two micro-steps each: our code read nothing back to the host.
        assert out["syncs"] == [] and out["reads"] == 0, out
        # Reading the three step losses (a log step) is one host transfer each, and they are real.
        assert out["reads_after"] == 3 and all(2.0 < v < 8.0 for v in out["values"]), out
        assert "NCCL cannot reduce CPU tensors" in out["refused"] and "meta" in out["refused"], out
