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
        ConfigError: fp16 without a GPU, a launcher that started another number of processes
            than accelerate runs, or a launch that asked for FSDP or DeepSpeed and does not get
            it (check_requested_distribution).
    """
    check_requested_distribution()  # before accelerate imports deepspeed for a DeepSpeed request
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
    check_requested_distribution(accelerator)
    set_seed(training.seed)
    return accelerator


def _is_set(environ, variable: str) -> bool:
    """Whether a launch asked for it: accelerate launch exports ACCELERATE_USE_FSDP and
    ACCELERATE_USE_DEEPSPEED from an FSDP or DeepSpeed config (or --use_fsdp, --use_deepspeed)."""
    return environ.get(variable, "").lower() in ("1", "true", "yes")


def check_requested_distribution(accelerator=None, environ=None) -> None:
    """Refuse a launch that asked for FSDP but does not get FSDP2, and every DeepSpeed launch.

    The trainer checkpoints FSDP2's DTensor shards; FSDP1 (accelerate's default fsdp_version)
    flattens parameters, which it cannot. accelerate enables FSDP only on GPUs: under
    ACCELERATE_USE_CPU=1, with no GPU visible or without a launcher, an FSDP config trains as
    plain data parallel (every process holds the whole model and optimizer) and says nothing. DeepSpeed is refused outright: ZeRO partitions
    the optimizer state in DeepSpeed's own format, which no checkpoint of this trainer holds, so
    a `last` checkpoint could not be resumed. Called without an accelerator (what the
    environment tells) before accelerate builds one, and with it afterwards.

    Raises:
        ConfigError: what was asked for, what accelerate set up, and what to launch instead.
    """
    environ = os.environ if environ is None else environ
    got = accelerator and accelerator.distributed_type.value
    if _is_set(environ, "ACCELERATE_USE_DEEPSPEED") or got == "DEEPSPEED":
        raise ConfigError(
            "this launch asks for DeepSpeed (a DeepSpeed accelerate config, --use_deepspeed or ACCELERATE_USE_DEEPSPEED=true), "
            "which the trainer does not support: ZeRO partitions the optimizer state over the processes, in DeepSpeed's own "
            "format, so the `last` checkpoint could not be resumed. Shard with FSDP2 instead (accelerate launch "
            "--config_file launch/fsdp_1node_8gpu.yaml): its checkpoints are sharded, pickle-free and resume on any number of GPUs.")
    if not _is_set(environ, "ACCELERATE_USE_FSDP"):
        return
    if (version := environ.get("FSDP_VERSION", "1")) != "2":  # accelerate's default is FSDP1
        raise ConfigError(
            f"this launch asks for FSDP version {version} (fsdp_config.fsdp_version in the accelerate config; 1 when it is not "
            "set), whose flattened parameters the trainer cannot checkpoint shard by shard, so `last` could not be resumed. "
            "Set fsdp_version: 2 (FSDP2, as launch/fsdp_1node_8gpu.yaml does).")
    on_cpu = _is_set(environ, "ACCELERATE_USE_CPU")
    got = got or ("MULTI_CPU" if on_cpu else None)  # before the Accelerator, ACCELERATE_USE_CPU=1 tells already
    if got is None or got == "FSDP":
        return
    why = ("ACCELERATE_USE_CPU=1 is set, and accelerate enables FSDP only on GPUs" if on_cpu else
           "no GPU is visible to the processes, or they were started without `accelerate launch`")
    raise ConfigError(
        f"this launch asks for FSDP (ACCELERATE_USE_FSDP=true, from an accelerate config, --use_fsdp or a plugin) but accelerate set "
        f"up {got} instead ({why}): every process would train a whole replica of the model and optimizer, not shards. "
        "Launch with `accelerate launch --config_file launch/fsdp_1node_8gpu.yaml` on machines whose GPUs are visible; to "
        "train data-parallel on CPU, say so with launch/cpu_multiprocess.yaml; to shard on CPU, give the trainer a model "
        "sharded with torch's fully_shard (README, Sharded training).")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2's fully_shard, tensor parallel): each process
    then holds only its shards of the model and of the optimizer state."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


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
