"""The exception types a user can act on; the CLI prints these as one line instead of a traceback."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from modelfleet.cluster.jobs import JobError
    from modelfleet.config import ConfigError
    from modelfleet.data.ingest import DataError
    from modelfleet.registry import ArtifactError
    from modelfleet.train.checkpoint import CheckpointError
    from modelfleet.train.trainer import TrainingFailedError

    return (JobError, ConfigError, DataError, ArtifactError, CheckpointError, TrainingFailedError)



USER_ERRORS: tuple[type[BaseException], ...] = _user_errors()
