"""DeepSpeed on CPU workers: the shared-memory all-reduce op that only inference uses is never
JIT-compiled (it cost every fresh checkout 60-90 s of g++ in its first training run)."""

from __future__ import annotations

import os


def test_the_cpu_inference_all_reduce_op_is_never_built(tmp_path, monkeypatch):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from modelfleet.train.deepspeed import SHM_COMM_OP, skip_cpu_inference_comm_op

    # An empty extensions cache: a build would land here (and take its minute of g++).
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, SHM_COMM_OP, True)  # restored afterwards
    skip_cpu_inference_comm_op()
    # What DeepSpeed's TorchBackend calls when the process group starts: None means gloo for all.
    assert build_shm_op() is None
    assert list(tmp_path.iterdir()) == []


def test_zero_optimizers_start_without_importing_deepspeeds_muon_kernels():
    """DeepSpeed's ZeRO code asks whether the optimizer is Muon by importing Muon's module, which
    builds torch.compile kernels (1-2 s per rank per run); the stand-in answers "no" without them.
    Run in a fresh interpreter: what is imported is a property of the whole process."""
    import subprocess
    import sys

    body = r"""
import os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import torch, deepspeed
from modelfleet.train.deepspeed import MUON_MODULE, skip_muon_import
skip_muon_import()
from deepspeed.runtime.zero.utils import is_zero_supported_optimizer
import deepspeed.comm as dist
dist.get_rank = lambda: 1  # no process group here: the check only logs on rank 0
opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # what stage3/stage_1_and_2 do
print("RESULT", is_zero_supported_optimizer(opt), isinstance(opt, MuonWithAuxAdam),
      "deepspeed.runtime.zero.muon.original_muon" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), out.stdout + out.stderr[-3000:])
    assert line == "RESULT True False False", line
