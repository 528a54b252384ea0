"""AcceleratedTrainer and its results; core.py holds the class (split into modules next)."""

from .core import AcceleratedTrainer, ModelError, NonFiniteLossError, Trainer, TrainingState, TrainResult

__all__ = ["AcceleratedTrainer", "ModelError", "NonFiniteLossError", "Trainer", "TrainResult", "TrainingState"]
