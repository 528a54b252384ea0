"""AcceleratedTrainer: coordinates data, model, optimizer, checkpoints, stopping and tracking.

It owns no policy: checkpoint policy is in checkpoint.py, stopping in early_stopping.py,
logging in tracking.py. Device placement, DDP/FSDP/DeepSpeed, mixed precision and gradient
accumulation are accelerate's.

One module per part of the trainer: core (AcceleratedTrainer: train(), the epochs and the step,
logging, validation and checkpoint calls), build (its parts built from the config: accelerator,
data, model, optimizer, schedule, components), forward (the model call and its loss), resume
(the run directory and resuming), state (TrainingState, TrainResult), report (messages and the
end-of-run summary).
"""

from .core import AcceleratedTrainer, NonFiniteLossError, Trainer
from .forward import ModelError
from .state import TrainingState, TrainResult

__all__ = ["AcceleratedTrainer", "ModelError", "NonFiniteLossError", "Trainer", "TrainResult", "TrainingState"]
