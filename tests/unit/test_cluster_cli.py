"""Cluster and job commands refuse bad input before anything starts (no Ray needed)."""

from __future__ import annotations

import shlex

import pytest

from modelfleet.cluster import jobs, local
from modelfleet.errors import ConfigError


def test_cluster_spec_defaults_and_overrides():
    spec = local.load_spec(None, nodes=2, gpus_per_node=0)
    assert spec.nodes == 2 and spec.gpus_per_node == 0 and spec.dashboard_port == 8265


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"nodes": 0}, "cluster.nodes"),
        ({"gpus_per_node": -1}, "cluster.gpus_per_node"),
        ({"dashboard_port": 80}, "cluster.dashboard_port"),
        ({"nodes": 40}, "at most 16"),
        # Types and choices as the root config reports them (one builder: config/coerce.py).
        ({"nodes": "three"}, "cluster.nodes: must be an integer, got 'three'"),
        ({"isolated": "yes"}, "cluster.isolated: must be true or false, got 'yes'"),
        ({"auth": "open"}, "cluster.auth: must be one of 'token', 'disabled', got 'open'"),
    ],
)
def test_cluster_spec_bad_values_name_the_key(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        local.load_spec(None, **kw)


def test_cluster_yaml_unknown_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("nodes: 2\ngpu_per_node: 1\n")
    with pytest.raises(
        ConfigError, match=r"cluster.gpu_per_node: unknown key; valid keys here: .*gpus_per_node.* \(cluster config "
    ):
        local.load_spec(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        local.load_spec(str(tmp_path / "missing.yaml"))


def test_commands_without_a_cluster_say_so(tmp_path, monkeypatch, capsys):
    from modelfleet.cli import main

    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path))
    assert main(["cluster", "status"]) == 2
    assert "no simulated cluster is up" in capsys.readouterr().err


def test_entrypoint_makes_paths_absolute_and_validates(tmp_path, monkeypatch):
    entry, info = jobs.build_entrypoint("train", None, ["train.max_steps=5"], preset="tiny")
    args = shlex.split(entry)
    assert args[:2] == ["python", "jobs/train.py"]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert "train.max_steps=5" in sets
    storage = next(s for s in sets if s.startswith("storage.path="))
    assert storage.split("=", 1)[1].startswith("/")  # a job's cwd is a temp copy: never relative
    with pytest.raises(ConfigError, match="not one of"):
        jobs.build_entrypoint("trian", None, [], preset="tiny")
    with pytest.raises(ConfigError, match="train.max_stepz"):
        jobs.build_entrypoint("train", None, ["train.max_stepz=5"], preset="tiny")
    outside = tmp_path / "c.yaml"
    outside.write_text("preset: tiny\n")
    with pytest.raises(ConfigError, match="outside the working directory"):
        jobs.build_entrypoint("train", str(outside), [])
