"""Training: Ray Train's TorchTrainer driving one DeepSpeed engine per worker."""

from modelfleet.train.checkpoint import CheckpointError
from modelfleet.train.trainer import TrainingFailedError, TrainResult, train

__all__ = ["CheckpointError", "TrainResult", "TrainingFailedError", "train"]
