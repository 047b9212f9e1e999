"""The host snapshot of asynchronous checkpoints (train/async_save.py), without a cluster: what a
save copies must not change when training changes the live tensors, and DeepSpeed's metadata
(torch.Size shapes, OrderedDicts) must keep the types its loaders and zero_to_fp32 read."""

from __future__ import annotations

import collections

import torch

from modelfleet.train.async_save import HostSnapshotEngine, host_copy


def test_the_snapshot_is_a_copy_that_keeps_tied_tensors_and_deepspeeds_types():
    w = torch.randn(3, 4)
    state = {
        "module": collections.OrderedDict(wte=w, head=w),  # tied weights: one tensor, two names
        "param_shapes": [collections.OrderedDict(wte=torch.Size([3, 4]))],
        "optimizer": {"state": {0: {"exp_avg": w * 2, "step": 7}}, "groups": (w[0], "adam")},
    }
    snap = host_copy(state)
    before = w.clone()
    w.add_(1.0)  # the next optimizer step, in place
    assert torch.equal(snap["module"]["wte"], before)
    assert snap["module"]["wte"] is snap["module"]["head"]  # copied once, still tied
    assert type(snap["module"]) is collections.OrderedDict
    assert type(snap["param_shapes"][0]["wte"]) is torch.Size  # zero_to_fp32 calls .numel() on it
    assert snap["optimizer"]["state"][0]["step"] == 7 and isinstance(snap["optimizer"]["groups"], tuple)
    assert torch.equal(snap["optimizer"]["groups"][0], before[0])


class _Writer:
    def __init__(self):
        self.saved, self.created = [], []

    def create(self, info):
        self.created.append(info)

    def save(self, state_dict, path):
        self.saved.append(path)

    def load(self, path, map_location=None):
        return {"loaded": path}


def test_the_snapshot_engine_keeps_files_instead_of_writing_and_loads_through_deepspeeds():
    inner = _Writer()
    eng = HostSnapshotEngine(inner)
    eng.create("tag")
    t = torch.ones(2)
    eng.save({"x": t}, "/ckpt/state/mp_rank_00_model_states.pt")
    assert inner.saved == [] and eng.commit("tag") is True  # nothing written in the step
    t.zero_()
    files = eng.take()
    assert [p for p, _ in files] == ["/ckpt/state/mp_rank_00_model_states.pt"]
    assert torch.equal(files[0][1]["x"], torch.ones(2)) and eng.take() == []
    assert eng.load("/a") == {"loaded": "/a"} and inner.created == ["tag"]
    assert eng.preserves_storage_sharing() is False and eng.is_decoupled() is False
