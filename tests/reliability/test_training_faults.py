"""Training faults on real Ray Train + DeepSpeed (ZeRO-3, 2 CPU workers, gloo), one run:

1. a rank is SIGKILLed while the step-20 checkpoint is being saved (some rank's files are in
   storage, COMPLETE is not): Ray Train restarts the group (train.max_failures=1) and the run
   resumes from step 10, never from the partial step 20;
2. a rank is killed again after the resume: the restart budget is spent, so ``train`` raises a
   TrainingFailedError naming the budget and the last complete checkpoint, within a bounded time;
3. the run is resubmitted with the same name (``--resume``): it resumes from step 10 (not from
   scratch, and still not from the partial step 20) and finishes.

The kill-a-worker-mid-run drill with its loss tolerance against an uninterrupted run is
tests/integration/test_training.py::test_kill_worker_resumes_from_last_complete_checkpoint;
stopping a real Ray job (``modelfleet jobs stop``) and resubmitting it with ``--resume`` is
tests/e2e/test_cluster.py::test_serving_beside_training_jobs (its training job is stopped, then resubmitted).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from helpers import read_records, tiny_config, train_worker_pids, wait_no_train_workers

ME = os.getpid()


def _steps(recs: list[dict], since: int = 0) -> list[int]:
    return [r["step"] for r in recs[since:] if r["kind"] == "step"]


@pytest.mark.slow  # several training runs and a mid-save kill: a long drill
def test_partial_checkpoint_failure_budget_and_resubmission(ray_session, tiny_data, tmp_path):
    from modelfleet.errors import TrainingFailedError
    from modelfleet.train import train

    cfg = tiny_config(
        tmp_path, tiny_data, ["deepspeed.zero_stage=3", "storage.run_name=faulty", "train.max_failures=1"]
    )
    run_dir = tmp_path / "runs" / "faulty"
    step20 = run_dir / "step_00000020"
    drill: dict = {}

    def killer() -> None:
        deadline = time.monotonic() + 300
        # 1. Mid-save: a rank's marker has reached storage but COMPLETE has not. Polled tightly:
        #    the window is the other rank's upload plus two barriers, a few ms on a quiet machine.
        #    So the 2 worker pids are found beforehand (a process scan takes longer than the
        #    window), and at the first marker every rank is frozen at once, which holds the save
        #    where it is while the victim is killed; then the survivor is let go.
        pids: list[int] = []
        while time.monotonic() < deadline and not drill.get("stop"):
            if len(pids) < 2:
                pids = train_worker_pids(ME)
            elif any(step20.glob("rank-*.json")) and not (step20 / "COMPLETE").exists():
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                complete = (step20 / "COMPLETE").exists()
                os.kill(pids[-1], signal.SIGKILL)
                for pid in pids[:-1]:
                    os.kill(pid, signal.SIGCONT)
                drill["save_kill"] = {
                    "pid": pids[-1],
                    "complete_at_kill": complete,
                    "files_at_kill": sorted(p.name for p in step20.iterdir()),
                }
                break
            time.sleep(0.002)
        else:
            return
        # 2. After the group restarted and resumed, kill again: the budget (1 restart) is spent.
        n0 = len(read_records(run_dir))
        while time.monotonic() < deadline and not drill.get("stop"):
            recs = read_records(run_dir)
            resumed = any(r["kind"] == "resume" for r in recs[n0:])
            if resumed and len(_steps(recs, n0)) >= 2:
                pids = train_worker_pids(ME)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    drill["budget_kill"] = {"t": time.monotonic(), "at_step": max(_steps(recs, n0))}
                    return
            time.sleep(0.05)

    wait_no_train_workers(ME)  # the pids the killer finds must be this run's, not an earlier test's
    th = threading.Thread(target=killer, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TrainingFailedError) as err:
            train(cfg, export=False, show_progress=False)
        t_err = time.monotonic()
    finally:
        drill["stop"] = True  # the killer gives up at once if training ended without its kills
        th.join(timeout=10)
    assert "save_kill" in drill, "no rank was killed during the step-20 save: the drill did not run"
    assert not drill["save_kill"]["complete_at_kill"], drill
    assert "budget_kill" in drill, "the second kill never happened"

    # 1. The partial step-20 checkpoint was left behind and the restart resumed from step 10.
    assert not (step20 / "COMPLETE").exists(), "the killed save completed anyway"
    resumes = [r for r in read_records(run_dir) if r["kind"] == "resume"]
    assert [r["step"] for r in resumes] == [10], resumes
    assert any("step_00000020 is partial" in s for s in resumes[0]["skipped"]), resumes[0]["skipped"]

    # 2. A clear error, soon after the budget-exceeding kill.
    fail_s = t_err - drill["budget_kill"]["t"]
    msg = str(err.value)
    assert "train.max_failures=1 allows no more restarts" in msg and "--resume faulty" in msg, msg
    assert "last complete checkpoint is step 10" in msg, msg
    assert fail_s < 60, f"training took {fail_s:.1f} s to fail after the budget was spent"

    # 3. Resubmitted with the same run: resumes from step 10 and trains only steps 11-30.
    n_before = len(read_records(run_dir))
    t_resub = time.monotonic()
    res = train(cfg, resume="faulty", export=False, show_progress=False)
    resub_s = time.monotonic() - t_resub
    recs = read_records(run_dir)[n_before:]
    resumed = [r for r in recs if r["kind"] == "resume"]
    assert [r["step"] for r in resumed] == [10], resumed
    assert any("step_00000020 is partial" in s for s in resumed[0]["skipped"]), resumed[0]["skipped"]
    assert min(_steps(recs)) == 11 and res.checkpoint_step == 30
    assert (step20 / "COMPLETE").exists()  # step 20 saved again, cleanly, by the resubmitted run
    wait_no_train_workers(ME)  # the shared Ray left as the next test expects it: no Train worker
    print(
        f"\n[train-faults] killed rank pid {drill['save_kill']['pid']} mid-save (step 20 had "
        f"{drill['save_kill']['files_at_kill']}, no COMPLETE); restart resumed from step 10; second kill at "
        f"step {drill['budget_kill']['at_step']} -> TrainingFailedError {fail_s:.1f} s later "
        f"(whole faulty run {t_err - t0:.1f} s); resubmission resumed from step 10, finished step 30 in "
        f"{resub_s:.1f} s, final val_loss {res.metrics.get('val_loss', float('nan')):.3f}\n  error: {msg}"
    )
