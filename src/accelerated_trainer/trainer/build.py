"""Building the trainer's parts from its config: the accelerator, the data loaders, the model
with its loss, optimizer and schedule (all prepared by accelerate), and the components that
hold policy (checkpointer, early stopping, tracker).

`AcceleratedTrainer.__init__` (core.py) runs the `_build_*` steps in order, each reading what
the ones before built.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed

from .. import data
from ..checkpoint import Checkpointer, ModelState, RunSignature
from ..checkpoint.states import MODEL, OPTIMIZER, TRAINER
from ..config import ConfigError, ExperimentOptions, TrainerConfig, TrainingOptions
from ..early_stopping import EarlyStopping
from ..metrics import build_loss
from ..models import build_model
from ..models import resolve as resolve_model
from ..optim import build_optimizer, build_scheduler
from ..tracking import Tracker, trackers_for
from .forward import BatchLoss
from .state import TrainingState


class TrainerParts:
    """The `_build_*` steps of AcceleratedTrainer.__init__: they set the parts the run uses."""

    config: TrainerConfig
    run_dir: Path

    def _build_accelerator(self) -> None:
        training = self.config.training_options
        self.accelerator = build_accelerator(training, self.config.experiment_options, self.run_dir)
        self._plain_optimizer = should_step_optimizer_directly(self.accelerator)
        # With one micro-batch per step the `accumulate` context and backward's division of the loss
        # by 1 do nothing but cost time; so does the prepared DataLoader for a single process.
        self._plain_step = self._plain_optimizer and training.gradient_accumulation_steps == 1

    def _build_data(self, train_dataset, eval_dataset, collate_fn) -> None:
        opts = self.config.dataset_options
        training = self.config.training_options
        with self.accelerator.main_process_first():
            splits = data.load_splits(opts, training.seed, train_dataset, eval_dataset)
        if splits.validation is None and training.early_stopping is not None:
            raise ConfigError("training_options.early_stopping needs validation data: set dataset_options.data_files.validation or validation_split.")
        label_dtype = torch.float32 if training.task == "regression" else torch.long
        self.train_loader = data.build_loader(
            splits.train, opts, label_dtype=label_dtype, batch_size=opts.batch_size, seed=training.seed, train=True,
            num_processes=self.accelerator.num_processes, collate_fn=collate_fn,
            in_process_device=self.accelerator.device if self._plain_step else None)
        self.train_sampler = self.train_loader.sampler  # the same object inside the prepared loader
        self.eval_loader = splits.validation and data.build_loader(
            splits.validation, opts, label_dtype=label_dtype, batch_size=opts.eval_batch_size or opts.batch_size,
            seed=training.seed, train=False, num_processes=self.accelerator.num_processes, collate_fn=collate_fn)
        self.data_info = data.describe(splits.train, opts, training.task, validation=splits.validation)
        self.data_fingerprint = splits.train._fingerprint  # datasets' content hash of the training split

    def _build_model(self, model: torch.nn.Module | None) -> None:
        training = self.config.training_options
        if model is None:
            if self.config.model_options is None:
                raise ConfigError("model_options: no model given; set model_options.name (e.g. \"mlp\") or pass a model to the trainer.")
            # The resolved options (input/output sizes from the data) go into config.json and checkpoints.
            self.config.model_options = resolve_model(self.config.model_options, self.data_info)
            model = build_model(self.config.model_options)
        else:
            self.config.model_options = None  # the model given wins; config.json must not claim another
        # HF models (and any forward with `labels`) compute their own loss when given the labels.
        # Not packed text's: its labels are already the next tokens, and a causal LM shifts them
        # again (it would learn the token after next); its logits are scored against them here.
        # Read before `prepare`: a DDP wrapper's forward takes only *args, **kwargs.
        pass_labels = "labels" in inspect.signature(model.forward).parameters and self.config.dataset_options.text is None
        self.loss_fn = build_loss(training.loss_function, training.task)
        optimizer = build_optimizer(training.optimizer, model)
        if isinstance(self.train_loader, data.InProcessLoader):
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        else:
            self.model, self.optimizer, self.train_loader = self.accelerator.prepare(model, optimizer, self.train_loader)
        if self.eval_loader is not None:
            self.eval_loader = self.accelerator.prepare(self.eval_loader)
        self.batch_loss = BatchLoss(self.model, self.loss_fn, pass_labels=pass_labels, task=training.task,
                                    label_column=self.config.dataset_options.label_column)
        self.steps_per_epoch = -(-len(self.train_loader) // training.gradient_accumulation_steps)
        self._samples_per_micro_batch = self.config.dataset_options.batch_size * self.accelerator.num_processes
        total = self.steps_per_epoch * training.n_epochs
        self.total_steps = min(total, training.max_steps) if training.max_steps else total
        stepped = self.optimizer.optimizer if self._plain_optimizer else self.optimizer
        # Stepped by hand once per optimizer step: accelerate's wrapper would step it once per process.
        # Built on the optimizer that is stepped: the schedule hooks that optimizer's step().
        self.scheduler = build_scheduler(training.scheduler, stepped, self.total_steps)
        self._optimizer_step, self._zero_grad = stepped.step, stepped.zero_grad

    def _build_components(self) -> None:
        training = self.config.training_options
        stopping = training.early_stopping
        self.early_stopping = stopping and EarlyStopping(training.mode, stopping.patience, stopping.min_delta)
        config = self.config.model_dump(mode="json")
        self.tracker = Tracker(self.accelerator, self.config.experiment_options, self.run_dir, config)
        self.state = TrainingState(num_processes=self.accelerator.num_processes)
        states = {MODEL: ModelState(self.accelerator, self.model), OPTIMIZER: self.optimizer, "scheduler": self.scheduler,
                  TRAINER: self.state}
        if (scaler := getattr(self.accelerator, "scaler", None)) is not None:
            states["scaler"] = scaler
        if self.early_stopping:
            states["early_stopping"] = self.early_stopping
        signature = RunSignature(config, self.accelerator.num_processes, self.train_sampler.num_rows, self.data_fingerprint,
                                 self.total_steps)
        self.checkpointer = Checkpointer(self.run_dir, self.accelerator, self.config.checkpoint, states, signature=signature,
                                         guard=self._check_finite)
        self.preempted = False
        self._step_skipped = False
        self._stop_on_nonfinite = self.config.training_options.nonfinite_loss == "stop"
        self.last_metrics: dict[str, float] = {}


def build_accelerator(training: TrainingOptions, experiment: ExperimentOptions, run_dir: Path) -> Accelerator:
    """A fresh Accelerator for this run, with the global seed set.

    Raises:
        ConfigError: fp16 without a GPU, or a launcher that started another number of processes
            than accelerate runs.
    """
    if training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("training_options.mixed_precision: fp16 needs a CUDA GPU and none is visible; use \"bf16\" on CPU or \"no\".")
    # accelerate keeps one AcceleratorState per process; a second trainer in the same process
    # (a notebook, a sweep) may want other precision settings. The process group is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        log_with=trackers_for(experiment) or None,
        project_dir=str(run_dir),
        # Data order is EpochSampler's pure function of (seed, epoch); accelerate need not sync
        # generators, and keeping the DataLoader's own generator keeps the global RNG untouched.
        rng_types=[],
        # A dead or hung process fails the job after this long instead of hanging it.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=experiment.distributed_timeout_s))],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"the launcher started {launched} processes but accelerate runs {accelerator.num_processes} "
            "(each would train alone and overwrite the others' files). On CPU use: ACCELERATE_USE_CPU=1 "
            f"accelerate launch --multi_gpu --num_processes {launched} train.py --config CFG."
        )
    set_seed(training.seed)
    return accelerator


def should_step_optimizer_directly(accelerator: Accelerator) -> bool:
    """Whether the trainer may call the optimizer itself instead of through accelerate's wrapper.

    The wrapper costs ~0.25 ms per step on CPU (two importlib look-ups for LOMO and an
    inspect.signature; bench/profile_step.py). Its work is needed only with a grad scaler (fp16),
    XLA or DeepSpeed; otherwise the trainer checks sync_gradients itself and calls the optimizer
    directly.
    """
    return getattr(accelerator, "scaler", None) is None and accelerator.distributed_type not in (
        DistributedType.XLA, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
