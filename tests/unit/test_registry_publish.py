"""registry.publish: a scratch directory handed over with ``consume=True`` is gone afterwards,
whether the publish succeeded or not, and a failed publish leaves the registry as it was."""

from __future__ import annotations

import json

import pytest

from modelfleet import registry


def _scratch(tmp_path, name: str, manifest: bool = True):
    d = tmp_path / name
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\0" * 1024)
    if manifest:
        (d / "manifest.json").write_text(json.dumps({"format_version": 1, "family": "gpt"}))
    return d


def test_consume_removes_the_scratch_directory_after_publishing(tmp_path):
    storage = tmp_path / "storage"
    kept = _scratch(tmp_path, "kept")
    assert registry.publish(str(storage), "m", str(kept)).version == "v1"
    assert kept.is_dir()  # the default copies and leaves the source alone
    scratch = _scratch(tmp_path, "scratch")
    ref = registry.publish(str(storage), "m", str(scratch), consume=True)
    assert ref.version == "v2" and not scratch.exists()
    assert json.loads((storage / "models" / "m" / "v2" / "manifest.json").read_text())["version"] == "v2"
    assert (storage / "models" / "m" / "v2" / "weights.bin").stat().st_size == 1024


def test_a_failed_publish_still_removes_the_scratch_and_keeps_the_registry(tmp_path):
    storage = tmp_path / "storage"
    registry.publish(str(storage), "m", str(_scratch(tmp_path, "first")), consume=True)
    broken = _scratch(tmp_path, "broken", manifest=False)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        registry.publish(str(storage), "m", str(broken), consume=True)
    assert not broken.exists()
    assert registry.versions(str(storage), "m") == ["v1"] and registry.resolve(str(storage), "m").version == "v1"
