"""Training: Ray Train's TorchTrainer driving one DeepSpeed engine per worker."""

from modelfleet.errors import CheckpointError, TrainingFailedError
from modelfleet.train.trainer import TrainResult, train

__all__ = ["CheckpointError", "TrainResult", "TrainingFailedError", "train"]
