"""The Accelerator of a run, and agreement across its processes.

Every agreement helper is called by every process at the same point and returns the same answer
on all of them; with one process it returns at once.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed

from .config import ConfigError, ExperimentOptions, TrainingOptions
from .tracking import trackers_for


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
        # A user's shuffled DataLoader: a seedable sampler makes its order a function of (seed, epoch) too,
        # so a resume that skips an epoch's first batches skips exactly the ones trained (data/torch_data.py).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=training.seed),
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


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any process."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return total.item() > 0


def first_error(accelerator, error: str | None) -> str | None:
    """The first process's error message, if any process has one; also a barrier."""
    errors = [error]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = gather_object([error])
    return next((e for e in errors if e), None)


def from_main(accelerator, value: Any) -> Any:
    """The main process's `value` (picklable), on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box)
    return box[0]
