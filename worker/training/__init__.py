"""The training engine: one job spec in, a trained adapter or model (and summary.json) out."""

from worker.training.recipe import Progress, TrainResult, train

__all__ = ["Progress", "TrainResult", "train"]
