"""Real Ray Train + real DeepSpeed (CPU, gloo) on 2 workers: stages, resume, export. The runs per
ZeRO stage are the session's ``stage_runs`` (tests/conftest.py), shared with test_elastic.py."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import read_records as _records
from helpers import tiny_config, train_worker_pids, wait_no_train_workers
from modelfleet.families.artifact import load_artifact
from modelfleet.storage import sha256_file


def _local_fs(path: Path):
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(path)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stage_trains_and_loss_falls(stage_runs, stage):
    _, runs = stage_runs
    cfg, res = runs[stage]
    recs = _records(res.run_dir)
    steps = [r for r in recs if r["kind"] == "step"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert steps[0]["loss"] > 4.0  # an untrained byte model sits near ln(257) = 5.55
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < steps[0]["loss"]
    assert evals[-1]["val_loss"] < 3.5
    assert res.checkpoint_step == 30 and res.metrics["step"] == 30
    assert all(r["tokens_per_s"] > 0 for r in steps)
    assert "time_to_first_step_s" in res.timings
    # Both save modes publish every checkpoint whole; an async one is recorded when published,
    # after its background write (so its record follows COMPLETE, never precedes it).
    from modelfleet.train import checkpoint as ck

    saves = [r for r in recs if r["kind"] == "checkpoint"]
    assert [r["step"] for r in saves] == [10, 20, 30]
    assert {r["mode"] for r in saves} == {cfg.train.checkpoint_mode} == {"sync" if stage == 0 else "async"}
    if stage:
        assert all(r["snapshot_s"] > 0 and r["write_s"] > 0 for r in saves), saves
    for step in (10, 20, 30):
        ck.validate(*_local_fs(Path(res.run_dir, ck.step_dir_name(step))))


def test_stage3_export_matches_live_engine(stage_runs):
    import torch
    from safetensors.torch import load_file

    from modelfleet import registry
    from modelfleet.train import checkpoint as ck

    storage, runs = stage_runs
    cfg, res = runs[3]
    art = res.artifact
    assert art is not None and art.name == "tiny"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "manifest.json"):
        assert Path(art.uri, f).is_file()
    manifest = registry.read_json(art.uri, "manifest.json")
    assert manifest["run_id"] == "stage3" and manifest["step"] == 30
    assert manifest["config"]["deepspeed"]["zero_stage"] == 3
    assert manifest["tokenizer"]["type"] == "byte"
    assert manifest["weights_sha256"] == sha256_file(str(Path(art.uri, "model.safetensors")))
    assert manifest["export_max_abs_logit_diff"] <= 1e-5
    # Independently: the artifact's logits against the live ZeRO-3 engine's, saved at the end.
    probe = load_file(str(Path(res.run_dir, ck.step_dir_name(30), ck.VERIFY_FILE)))
    model, tok, _ = load_artifact(art.uri)
    with torch.no_grad():
        logits = model(probe["tokens"].long())
    assert torch.allclose(logits, probe["logits"], atol=1e-5, rtol=0)
    assert registry.resolve(str(storage), "tiny").version == art.version


def test_kill_worker_during_the_background_write_resumes_from_last_complete_checkpoint(stage_runs, tiny_data):
    """SIGKILL a training worker while the step-20 checkpoint is being written in the background
    (asynchronous saves: some of its files are in storage, not every rank's marker, no COMPLETE):
    the step-20 checkpoint is never published, Ray Train restarts the group, the loop restores
    step 10 and finishes; the final loss matches the uninterrupted run."""
    from modelfleet.train import train

    storage, runs = stage_runs
    cfg = tiny_config(storage, tiny_data, ["deepspeed.zero_stage=3", "storage.run_name=killed", "train.max_failures=1"])
    assert cfg.train.checkpoint_mode == "async"
    run_dir = os.path.join(storage, "runs", "killed")
    step20 = Path(run_dir, "step_00000020")
    killed, stop = {}, threading.Event()

    def killer():
        # The window is the ranks' uploads (tens of ms here), so the 2 worker pids are found
        # beforehand and, at the first file of step 20 in storage, every rank is frozen at once;
        # the save is checked to be still unpublished, one rank is killed and the other let go.
        deadline = time.time() + 240
        pids: list[int] = []
        while time.time() < deadline and not stop.is_set():
            if len(pids) < 2:
                pids = train_worker_pids(os.getpid())  # only this session's Ray
                time.sleep(0.05)
                continue
            if step20.is_dir() and any(step20.iterdir()):
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                markers = len(list(step20.glob("rank-*.json")))
                if markers < 2 and not (step20 / "COMPLETE").exists():
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.update(pid=pids[-1], markers=markers, files=sorted(p.name for p in step20.rglob("*")))
                for pid in pids[:-1] if killed else pids:
                    os.kill(pid, signal.SIGCONT)
                return
            time.sleep(0.002)

    wait_no_train_workers(os.getpid())  # the killer must find this run's workers, not an earlier test's
    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        res = train(cfg, show_progress=False)
    finally:
        stop.set()  # never a kill after the run: the next test's workers are not this drill's
        th.join(timeout=5)
    assert killed, "no worker was killed during step 20's background write: the drill did not run"
    recs = _records(run_dir)
    resumes = [r for r in recs if r["kind"] == "resume"]
    assert [r["step"] for r in resumes] == [10], (resumes, killed)
    assert any("step_00000020 is partial" in s for s in resumes[0]["skipped"]), resumes[0]["skipped"]
    first = recs.index(resumes[0])
    assert 20 not in [r["step"] for r in recs[:first] if r["kind"] == "checkpoint"], "step 20 was published"
    assert res.checkpoint_step == 30 and (step20 / "COMPLETE").exists()  # saved again after the resume
    base = runs[3][1].metrics["val_loss"]
    # Same seed and data, restored optimizer and LR state: only Ray Data's order after the
    # restart may differ, so the final validation loss agrees within 5%.
    assert abs(res.metrics["val_loss"] - base) <= 0.05 * base
    wait_no_train_workers(os.getpid())  # the shared Ray left as the next test expects it


def test_partial_or_corrupt_checkpoint_is_never_restored(stage_runs, tiny_data):
    from modelfleet.train import checkpoint as ck
    from modelfleet.train import train

    storage, runs = stage_runs
    src = Path(runs[3][1].run_dir)
    dst = src.parent / "partial"
    shutil.copytree(src, dst)
    (dst / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    (dst / ck.step_dir_name(30) / "rank-00001.json").unlink()  # a missing shard marker
    (dst / ck.step_dir_name(20) / ck.COMPLETE).unlink()  # a missing completion marker
    found, skipped = ck.latest_complete(str(storage / "runs"), "partial")
    assert found.step == 10 and len(skipped) == 2
    cfg = tiny_config(storage, tiny_data, ["deepspeed.zero_stage=3"])
    res = train(cfg, resume="partial", export=False, show_progress=False)
    resumes = [r for r in _records(str(dst)) if r["kind"] == "resume"]
    assert [r["step"] for r in resumes] == [10]
    assert "rank 1's shard marker is missing" in " ".join(resumes[0]["skipped"])
    assert res.checkpoint_step == 30


def test_a_stop_signal_checkpoints_at_the_next_step_and_the_resumed_run_redoes_none(ray_session, tiny_data, tmp_path):
    """SIGTERM to the driver during the fit (what `jobs stop` sends it): every rank checkpoints at
    the next step boundary, the run ends with TrainingStoppedError naming that checkpoint, and
    `--resume` continues from it: no step is trained twice."""
    import signal as sig

    from modelfleet.errors import TrainingStoppedError
    from modelfleet.train import train

    cfg = tiny_config(tmp_path, tiny_data, ["deepspeed.zero_stage=2", "storage.run_name=stopped"])
    run_dir = os.path.join(tmp_path, "runs", "stopped")
    sent: dict = {}

    def stopper():
        deadline = time.time() + 240
        while time.time() < deadline and not sent:
            steps = [r["step"] for r in _records(run_dir) if r["kind"] == "step"]
            if steps and max(steps) >= 13:  # between checkpoints (10 and 20)
                # Never the default handler: that would end this whole test session.
                if sig.getsignal(sig.SIGTERM) in (sig.SIG_DFL, None):
                    sent["no_handler"] = max(steps)
                    return
                sent["at_step"] = max(steps)
                os.kill(os.getpid(), sig.SIGTERM)
                return
            time.sleep(0.05)

    wait_no_train_workers(os.getpid())
    th = threading.Thread(target=stopper, daemon=True)
    th.start()
    try:
        with pytest.raises(TrainingStoppedError) as err:
            train(cfg, show_progress=False)
    finally:
        th.join(timeout=5)
    assert "at_step" in sent, f"no SIGTERM was sent: {sent or 'the run ended first'}"
    recs = _records(run_dir)
    stopped = [r for r in recs if r["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "SIGTERM to the driver", stopped
    at = stopped[0]["step"]
    # At most a few steps on: the test sees step records up to 0.5 s late (the sink's poll), and
    # rank 0 reads the flag without blocking, so a request is seen at its next step or the one after.
    assert sent["at_step"] <= at <= sent["at_step"] + 3, (sent, at)
    assert max(r["step"] for r in recs if r["kind"] == "step") == at  # nothing trained past it
    assert f"checkpoint at step {at} is complete" in str(err.value) and "--resume stopped" in str(err.value)
    wait_no_train_workers(os.getpid())

    res = train(cfg, resume="stopped", export=False, show_progress=False)
    after = _records(run_dir)[len(recs) :]
    assert [r["step"] for r in after if r["kind"] == "resume"] == [at]
    assert min(r["step"] for r in after if r["kind"] == "step") == at + 1  # none redone
    assert res.checkpoint_step == 30
    print(f"\n[stop] SIGTERM at step {sent['at_step']}: checkpointed and stopped at step {at}; resumed at {at + 1}")
    wait_no_train_workers(os.getpid())
