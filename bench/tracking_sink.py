"""tracking-sink: the driver's progress sink's CPU time per record, tracking on against off.

N synthetic step records (the fields rank 0 sends) go through ``ProgressSink._handle`` as the
sink's thread hands them over, into a local run directory, in two runs: ``tracking.enabled=false``
(the baseline: metrics.jsonl and the Prometheus gauges) and ``=true`` (TensorBoard event files and
an MLflow run in the run's SQLite store). Per run:

- the sink's CPU per record: ``time.thread_time()`` of the feeding thread over N (what a record
  costs the thread that also drains the progress queue);
- the process's CPU per record: ``time.process_time()`` from the first record until the tracker
  has closed (every thread: the writer's conversion, TensorBoard's writer, MLflow's SQLite
  writes; MLflow's import and database creation included, as a run pays them once).

    python bench/tracking_sink.py [--records 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import save, table

from modelfleet.config import Config
from modelfleet.train import progress as pr
from modelfleet.train.sink import ProgressSink


def one(enabled: bool, n: int) -> dict:
    root = tempfile.mkdtemp(prefix="bench-tracking-")
    cfg = Config.from_dict({"storage": {"path": root, "run_name": "bench"}, "tracking": {"enabled": enabled}})
    sink = ProgressSink(None, cfg, f"{root}/runs/bench", show=False)
    now = time.time()
    recs = [
        pr.Step(
            time=now + i,
            step=i,
            max_steps=n,
            loss=5.0 / i,
            lr=1e-3,
            grad_norm=0.7,
            step_time_s=0.1,
            samples_per_s=160.0,
            tokens_per_s=20480.0,
            model_flops_per_token=1.2e6,
            mfu=0.02,
            mfu_basis="cpu_gemm_measured",
            peak_flops=1.0e11,
            peak_mem_bytes=2**30,
            peak_mem_basis="process_max_rss",
            elapsed_s=float(i),
            epoch=0,
        )
        for i in range(1, n + 1)
    ]
    p0, t0 = time.process_time(), time.thread_time()
    for r in recs:
        sink.handle(r)
    sink_cpu = time.thread_time() - t0
    summary = sink.tracker.close(timeout_s=600)
    proc_cpu = time.process_time() - p0
    return {
        "tracking": "on" if enabled else "off",
        "records": n,
        "sink_cpu_us_per_record": 1e6 * sink_cpu / n,
        "process_cpu_us_per_record": 1e6 * proc_cpu / n,
        "tracked": summary.records if summary else 0,
        "dropped": summary.dropped if summary else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=2000)
    args = ap.parse_args()
    rows = [one(False, args.records), one(True, args.records)]
    off, on = rows
    ratio = {
        "sink_ratio": on["sink_cpu_us_per_record"] / off["sink_cpu_us_per_record"],
        "process_ratio": on["process_cpu_us_per_record"] / off["process_cpu_us_per_record"],
    }
    print(table(rows, list(rows[0])))
    print(ratio)
    print(save("tracking_sink", {"rows": rows, **ratio}))


if __name__ == "__main__":
    main()
