"""Bad input stops before any training starts, with one sentence, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_config
from modelfleet.errors import CheckpointError, ConfigError, DataError
from modelfleet.train import train


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_missing_data_path(tmp_path):
    cfg = tiny_config(tmp_path, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"data.path '.*nowhere' does not exist; run `modelfleet prepare"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_empty_dataset(tmp_path):
    from modelfleet.config import DataConfig
    from modelfleet.data.prepare import prepare_dataset
    from modelfleet.data.tokenizer import ByteTokenizer

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="yielded 0 tokens"):
        prepare_dataset(
            DataConfig(sources=[str(tmp_path / "empty.txt")], path=str(tmp_path / "d")), 128, ByteTokenizer()
        )


def test_too_few_sequences_for_the_batch(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, ["train.micro_batch_size=100000"])
    with pytest.raises(ConfigError, match="fewer than train.micro_batch_size x train.num_workers"):
        train(cfg)


def test_more_workers_than_the_cluster_holds(ray_session, tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, ["train.num_workers=64", "train.micro_batch_size=1"])
    with pytest.raises(
        ConfigError,
        match=r"train.num_workers: 64 workers x 1 CPU need 64 CPUs but the "
        r"cluster has \d+",
    ):
        train(cfg)
    cfg = tiny_config(tmp_path, tiny_data, ["train.use_gpu=true"])
    with pytest.raises(ConfigError, match="train.use_gpu: 2 workers need 2 GPUs but the cluster has 0"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_never_overwritten(tmp_path, tiny_data):
    run = tmp_path / "runs" / "taken"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "step"}\n')
    before = _tree(tmp_path)
    cfg = tiny_config(tmp_path, tiny_data, ["storage.run_name=taken"])
    with pytest.raises(ConfigError, match="run 'taken' already exists .* resume it with --resume taken"):
        train(cfg)
    assert _tree(tmp_path) == before


def test_resume_with_only_partial_checkpoints(tmp_path, tiny_data):
    ckpt = tmp_path / "runs" / "broken" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "rank-00000.json").write_text(json.dumps({"files": {}}))
    before = _tree(tmp_path)
    cfg = tiny_config(tmp_path, tiny_data)
    with pytest.raises(
        CheckpointError,
        match="run 'broken' has no complete checkpoint to resume from "
        r"\(checkpoint step_00000010 is partial: its COMPLETE",
    ):
        train(cfg, resume="broken")
    with pytest.raises(ConfigError, match="--resume: run 'ghost' does not exist"):
        train(cfg, resume="ghost")
    assert _tree(tmp_path) == before


def test_offload_and_stage_the_machine_cannot_run(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer: offloading to CPU needs GPU workers"):
        tiny_config(tmp_path, tiny_data, ["deepspeed.offload_optimizer=true"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: must be 0, 1, 2 or 3, got 5"):
        tiny_config(tmp_path, tiny_data, ["deepspeed.zero_stage=5"])
