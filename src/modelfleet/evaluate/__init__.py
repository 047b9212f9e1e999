"""Evaluation: batch inference over held-out rows (``batch``), reports (``report``), K-fold
cross-validation (``kfold``) and the promotion gate of ``deploy --if-better`` (``gate``)."""

from modelfleet.evaluate.batch import batch_predict, evaluate_artifact
from modelfleet.evaluate.report import loss_curve, run_dir_of, write_report

__all__ = ["batch_predict", "evaluate_artifact", "loss_curve", "run_dir_of", "write_report"]
