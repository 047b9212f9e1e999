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
