"""What the test modules share, imported by name: ``from helpers import wait_until, tiny_config``.
(A package of its own, not conftest.py: several conftest.py files exist and ``from conftest import``
would pick one at random. pytest puts ``tests/`` on ``sys.path``; ``tests/reliability/soak.py``,
run as a plain script, puts it there itself.)

- ``waiting``: ``wait_until`` (the one poll helper: every wait polls a condition with a generous
  bound, never a fixed sleep), ``port_free``, ``wait_port_free``.
- ``ray_procs``: Ray's processes found through the OS (train workers, Serve replicas), ``pid_alive``,
  ``wait_no_train_workers``.
- ``training``: ``TEST_SOURCES``, ``tiny_config``, ``read_records`` (a run's metrics.jsonl).
- ``serving``: ``publish_tiny_models``, ``publish_adapters`` (random LoRA adapters over one), ``serve_on`` (Serve on a port for one module, started and
  stopped by condition), ``deploy_app``, ``running_replicas``, ``run_load`` (bounded load).
- ``cli``: ``cli_env``, ``run_cli``, ``mf``, ``job_status``, ``wait_job``.
- ``cluster``: ``SimCluster`` (``modelfleet cluster up``/``down``, Ray's state API).
- ``s3``: ``MotoS3``, moto's S3 server on 127.0.0.1 with IAM auth (the ``s3`` session fixture).

Clusters. By default a test shares one Ray instance per session (``ray_session``, tests/conftest.py;
integration and reliability tests; each module's Serve comes and goes on it through ``serve_on``)
and the e2e tests share one simulated cluster (``cluster``, tests/e2e/conftest.py; session-scoped,
taken down as soon as the last e2e test has run so that it does not hold 3 nodes' worth of processes
through the rest of the suite). Each test cleans up its Serve apps and jobs.

Drills that own their cluster:

- tests/reliability/test_security.py (every test using ``cluster``): its own
  ``modelfleet cluster up --nodes 1`` (GCS 6680, dashboard 8465, Serve 8300), started with the
  serving API key in the submitting environment: the secrets drill scans that cluster's ``up``
  output, state and session logs for the key and the Ray token, and the token drill connects
  drivers and job submissions to it without the token.
- tests/e2e/test_cluster.py::test_training_survives_kill_node: kills a worker node of the e2e
  cluster (``cluster_to_break``); it runs last in its module and marks the cluster spoiled, so any
  later e2e test would get a fresh cluster rather than one with a dead node.

Drills that kill processes but stay on the shared Ray (Ray replaces them by design; a private Ray
would cost two ~10 s start-ups each on 2 cores). Each one kills only descendants of this pytest
process and leaves by condition, not by time:

- tests/integration/test_training.py::test_kill_worker_resumes_from_last_complete_checkpoint and
  tests/reliability/test_training_faults.py::test_partial_checkpoint_failure_budget_and_resubmission
  (SIGKILL/SIGSTOP of Ray Train workers): wait until no Train worker is left.
- tests/reliability/test_serving_faults.py (SIGKILL/SIGSTOP of Serve replicas): wait until Serve has
  replaced the victim, then delete the app; the module's ``serve_on`` waits for Serve to be gone.
"""

from .cli import BIN, ROOT, cli_env, job_status, mf, run_cli, wait_job
from .cluster import SimCluster
from .ray_procs import (
    engine_core_pids,
    pid_alive,
    ray_process_pids,
    serve_replica_pids,
    train_worker_pids,
    wait_no_train_workers,
)
from .s3 import MotoS3
from .serving import (
    LoadResult,
    deploy_app,
    publish_adapters,
    publish_tiny_models,
    run_load,
    running_replicas,
    serve_gone,
    serve_on,
)
from .training import (
    TEST_SOURCES,
    assert_sharded_share,
    built_record,
    read_records,
    run_single_rank,
    step_record,
    tiny_config,
)
from .waiting import port_free, wait_port_free, wait_until

__all__ = [
    "engine_core_pids",
    "BIN",
    "ROOT",
    "TEST_SOURCES",
    "assert_sharded_share",
    "built_record",
    "LoadResult",
    "MotoS3",
    "SimCluster",
    "cli_env",
    "deploy_app",
    "job_status",
    "mf",
    "pid_alive",
    "port_free",
    "publish_adapters",
    "publish_tiny_models",
    "ray_process_pids",
    "read_records",
    "run_cli",
    "run_load",
    "run_single_rank",
    "running_replicas",
    "serve_gone",
    "serve_on",
    "serve_replica_pids",
    "step_record",
    "tiny_config",
    "train_worker_pids",
    "wait_job",
    "wait_no_train_workers",
    "wait_port_free",
    "wait_until",
]
