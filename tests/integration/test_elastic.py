"""ZeRO checkpoints re-partitioned across worker counts (real Ray Train + DeepSpeed, CPU/gloo):
a checkpoint written by 2 workers resumes on 4 and the 4-worker one on 2, with ZeRO-2 and ZeRO-3,
through DeepSpeed's universal checkpoint format. The restored model's logits on the probe the
checkpoint saved equal the saved ones within 1e-5 (the loop measures them and says so in the
``resize`` record); training continues with grad_accum recomputed for the global batch, and the
data position carries over as a global sample count.

The 2-worker checkpoint is the session's 30-step run of that stage (``stage_runs``,
tests/conftest.py), copied: training it again here would cost one more fit per stage.

The way up runs elastic (``train.num_workers: [2, 4]``, started with what the cluster has). The
[min, max] drill with a node lost and regained mid-run needs its own multi-node cluster:
tests/e2e/test_elastic_drill.py (make test-slow)."""

from __future__ import annotations

import os
import shutil

import pytest

from helpers import read_records, tiny_config, wait_no_train_workers


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_of_2_workers_resumes_on_4_and_back_on_2(stage_runs, tiny_data, tmp_path, stage):
    from modelfleet.train import train

    run = f"resize{stage}"
    _, runs = stage_runs
    first = runs[stage][1]  # 2 workers, 30 steps; its last checkpoint holds its probe logits
    assert first.checkpoint_step == 30
    base = first.checkpoint_step
    # A copy under this test's storage: the shared run stays as the training tests expect it.
    # Ray Train's snapshot names the original's checkpoints (see stage_runs): left behind.
    shutil.copytree(
        first.run_dir, tmp_path / "runs" / run, ignore=shutil.ignore_patterns("checkpoint_manager_snapshot.json")
    )

    def leg(workers: int | str, steps: int):
        wait_no_train_workers(os.getpid())
        cfg = tiny_config(
            tmp_path,
            tiny_data,
            [
                f"deepspeed.zero_stage={stage}",
                f"storage.run_name={run}",
                f"train.num_workers={workers}",
                f"train.max_steps={steps}",
                "train.micro_batch_size=4",
                "train.eval_every=0",
                "train.checkpoint_every=0",
            ],
        )
        return train(cfg, resume=run, export=False, show_progress=False)

    # The way up is elastic, train.num_workers [2, 4]: Ray Train's elastic policy starts the group
    # with what the cluster has between 2 and 4 (the session's Ray has room for 4), so a [min, max]
    # run trains, and restores a checkpoint of another size, in every run of the suite.
    up = leg("[2,4]", base + 2)
    down = leg(2, base + 4)
    run_dir = tmp_path / "runs" / run
    recs = read_records(run_dir)
    resizes = [r for r in recs if r["kind"] == "resize"]  # the driver's: the worker group changed size
    assert [(r["step"], r["from_workers"], r["to_workers"]) for r in resizes] == [
        (base, 2, 4),
        (base + 2, 4, 2),
    ], resizes
    reshards = [r for r in recs if r["kind"] == "reshard"]  # the loop's: a checkpoint re-partitioned
    assert [(r["step"], r["from_workers"], r["to_workers"]) for r in reshards] == [
        (base, 2, 4),
        (base + 2, 4, 2),
    ], reshards
    for r in reshards:
        assert r["max_abs_logit_diff"] <= 1e-5, r
    assert up.checkpoint_step == base + 2 and down.checkpoint_step == base + 4
    steps = [r["step"] for r in recs if r["kind"] == "step"]
    assert steps == list(range(1, base + 5)), steps  # every optimizer step exactly once across the three runs
    built = [r["world"] for r in recs if r["kind"] == "built"]
    assert built == [2, 4, 2]
    print(
        f"\n[resize ZeRO-{stage}] "
        + "; ".join(
            f"{r['from_workers']}->{r['to_workers']} at step {r['step']}: logits max diff {r['max_abs_logit_diff']:.2e}, "
            f"restore {r['restore_s']:.2f} s"
            for r in reshards
        )
    )
    wait_no_train_workers(os.getpid())
