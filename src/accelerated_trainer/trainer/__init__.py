"""AcceleratedTrainer: coordinates data, model, optimizer, checkpoints, stopping and tracking.

Checkpoint policy (cadence, top-k, failures, resume) is the checkpoint package's, stopping
early_stopping.py's, logging tracking.py's. Device placement, DDP/FSDP/DeepSpeed, mixed precision and gradient
accumulation are accelerate's.

One module per part of the trainer: core (AcceleratedTrainer: train(), the epochs and the step,
logging, validation and checkpoint calls), build (its parts built from the config: accelerator,
data, model, optimizer, schedule, components), forward (the model call and its loss), state
(TrainingState, TrainResult).
"""

from .core import AcceleratedTrainer, NonFiniteLossError, Trainer
from .forward import ModelError
from .state import TrainingState, TrainResult

__all__ = ["AcceleratedTrainer", "ModelError", "NonFiniteLossError", "Trainer", "TrainResult", "TrainingState"]
