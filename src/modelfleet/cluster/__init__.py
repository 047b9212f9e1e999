"""How modelfleet reaches a Ray cluster: ``connect`` (the only way code becomes a Ray driver) to
an existing one, a simulated local one (``local``), or a new local instance; Ray jobs (``jobs``).
Nothing here imports Ray at import time: Ray reads its auth mode from the environment once, so
``cluster.local`` must be able to set it first."""

JOBS = ("train", "export", "deploy", "pipeline")
"""The Ray Job entrypoints in ``jobs/`` (``modelfleet submit JOB``)."""

from modelfleet.cluster.connect import connect  # noqa: E402 - JOBS first: cluster.jobs imports it

__all__ = ["JOBS", "connect"]
