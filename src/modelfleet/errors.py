"""Every error type a user can act on. The CLI prints these as one line instead of a traceback.

This module is the floor of the package: it imports nothing of ours, so any layer may raise them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key and what would be valid."""


class DataError(ValueError):
    """A data source or prepared dataset is unusable; the message names it and what is wrong."""


class ArtifactError(ValueError):
    """An artifact reference or directory is invalid; the message names it."""


class CheckpointError(RuntimeError):
    """A checkpoint is partial, corrupt or missing; the message names it and what is wrong."""


class TrainingFailedError(RuntimeError):
    """A training run failed after spending its restart budget; the message says where to resume."""


class TrainingStoppedError(RuntimeError):
    """A run stopped on request (``jobs stop``, Ctrl-C) after checkpointing where it stood."""


class JobError(RuntimeError):
    """A Ray job could not be submitted, or ended in a state other than SUCCEEDED."""


class ClusterError(RuntimeError):
    """The local cluster cannot do what was asked (a node did not start or register, a port is
    taken, the cluster is already up, a node is not in the state the operation needs)."""


class StorageError(ValueError):
    """A storage URI or path cannot be used; the message names it and the cause."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    ArtifactError,
    CheckpointError,
    TrainingFailedError,
    TrainingStoppedError,
    JobError,
    StorageError,
    ClusterError,
)
"""What the CLI reports as one line (exit 2 for config errors, 1 otherwise)."""
