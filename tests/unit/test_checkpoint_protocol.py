"""The checkpoint validity rules on real files: markers, sizes and hashes (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelfleet.train import checkpoint as ck


def _make(root: Path, run: str, step: int, world: int = 2, complete: bool = True) -> Path:
    d = root / "runs" / run / ck.step_dir_name(step)
    for rank in range(world):
        local = root / f"local-{step}-{rank}"
        (local / ck.DS_TAG).mkdir(parents=True)
        # A real torch.save file: validate() also reads every pickle with the restricted unpickler.
        torch.save(
            {"state": torch.full((16,), float(rank))}, local / ck.DS_TAG / f"zero_pp_rank_{rank}_optim_states.pt"
        )
        ck.write_rank_marker(str(local), rank, world, step)
        for p in local.rglob("*"):  # Ray Train merges every rank's directory into one
            if p.is_file():
                dest = d / p.relative_to(local)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(p.read_bytes())
    if complete:
        ck.write_complete(str(root / "runs"), run, step, world)
    return d


def test_latest_complete_skips_partial_and_corrupt(tmp_path):
    _make(tmp_path, "r", 10)
    _make(tmp_path, "r", 20, complete=False)
    d30 = _make(tmp_path, "r", 30)
    (d30 / "rank-00001.json").unlink()
    d40 = _make(tmp_path, "r", 40)
    shard = d40 / ck.DS_TAG / "zero_pp_rank_0_optim_states.pt"
    shard.write_bytes(b"\x07" + shard.read_bytes()[1:])  # same size, different bytes
    found, skipped = ck.latest_complete(str(tmp_path / "runs"), "r")
    assert found is not None and found.step == 10
    assert skipped == [
        "checkpoint step_00000040 is corrupt: rank 0's file state/zero_pp_rank_0_optim_states.pt does not "
        "match its recorded sha256",
        "checkpoint step_00000030 is partial: rank 1's shard marker is missing",
        "checkpoint step_00000020 is partial: its COMPLETE marker is missing",
    ]


def test_missing_file_and_no_checkpoint(tmp_path):
    d = _make(tmp_path, "r", 10)
    (d / ck.DS_TAG / "zero_pp_rank_1_optim_states.pt").unlink()
    found, skipped = ck.latest_complete(str(tmp_path / "runs"), "r")
    assert found is None and "rank 1's file state/zero_pp_rank_1_optim_states.pt is missing" in skipped[0]
    assert ck.latest_complete(str(tmp_path / "runs"), "absent") == (None, [])


def test_export_refuses_a_run_without_complete_checkpoint(tmp_path):
    from modelfleet.train.export import export_run

    _make(tmp_path, "r", 10, complete=False)
    with pytest.raises(
        ck.CheckpointError,
        match="run 'r' under .* has no complete checkpoint "
        r"\(checkpoint step_00000010 is partial",
    ):
        export_run(str(tmp_path), "r")
    assert not (tmp_path / "models").exists()
