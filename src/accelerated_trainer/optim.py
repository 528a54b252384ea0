"""Optimizer and learning-rate schedule from their config sections, and the optimizer step."""

from __future__ import annotations

import inspect
import math
import sys
from typing import Callable

import torch
from accelerate.utils import DistributedType
from torch import nn

from .config import ConfigError, OptimizerOptions, SchedulerOptions


def build_optimizer(options: OptimizerOptions, model: nn.Module) -> torch.optim.Optimizer:
    """Any torch.optim class by name. Biases and norm weights (tensors under 2-D) get no weight decay."""
    cls = getattr(torch.optim, options.name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"training_options.optimizer.name: {options.name!r} is not a torch.optim optimizer (e.g. AdamW, SGD, Adam).")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": options.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(options.kwargs)
    # torch's default on CPU is the per-parameter for-loop; the fused kernel measured 0.2 ms faster
    # per tiny step and ~5 ms per compute-bound step (bench/bench_step.py, variants c and c').
    if _accepts(cls, "fused") and not {"fused", "foreach"} & kwargs.keys() and all(p.is_floating_point() for p in params):
        kwargs["fused"] = True
    try:
        return cls([g for g in groups if g["params"]], lr=options.lr, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"training_options.optimizer: {options.name} rejects its arguments: {err}.") from None


def _accepts(cls, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def build_scheduler(options: SchedulerOptions, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the optimizer's lr, then constant, linear or cosine decay to 0 at total_steps.

    A LambdaLR keeps its state JSON-friendly (step counters and base lrs), so checkpoints need no pickle.
    """
    warmup = options.warmup_steps or math.ceil(options.warmup_ratio * total_steps)
    decay_steps = max(total_steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / decay_steps, 1.0)
        if options.name == "linear":
            return 1.0 - progress
        if options.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def should_step_optimizer_directly(accelerator) -> bool:
    """Whether the optimizer may be called directly instead of through accelerate's wrapper.

    The wrapper's work is needed only with a grad scaler (fp16), XLA or DeepSpeed; elsewhere it
    costs two importlib look-ups and an inspect.signature per step (bench/profile_step.py).
    """
    return getattr(accelerator, "scaler", None) is None and accelerator.distributed_type not in (
        DistributedType.XLA, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def steps_every_micro_batch(accelerator) -> bool:
    """Whether every micro-batch is a whole optimizer step taken directly (OptimizerStep's fast path)."""
    return should_step_optimizer_directly(accelerator) and accelerator.gradient_accumulation_steps == 1


class OptimizerStep:
    """The optimizer step, one object whatever path it takes.

    `micro_batch(batch)` runs the forward and backward of one micro-batch and, when the
    gradients sync (the last micro-batch of an accumulation), the step: clip or measure the
    gradient norm, skip a non-finite one (nonfinite_loss "skip"), hold on `before_step` (an
    asynchronous save still copying the weights), step the optimizer and the schedule, zero
    the gradients. Where accelerate's optimizer wrapper has nothing to do the optimizer is
    stepped directly; with one micro-batch per step the backward also skips the `accumulate`
    context and the division of the loss by 1. Otherwise everything goes through accelerate.

    Args:
        accelerator / model / optimizer: prepared by accelerate.
        loss_of: the mean loss of a batch (forward included).
        scheduler: options of the schedule, built here on the optimizer that is stepped, over
            `total_steps` optimizer steps (stepped once per step: accelerate's wrapper would step
            it once per process).
        max_grad_norm: clip to this norm, or None.
        skip_nonfinite: skip steps whose gradient norm is NaN/inf (one host sync per step).
        wants_grad_norm: whether this step's norm will be logged (it is measured only then).
        before_step: called right before the optimizer changes the weights.
    """

    def __init__(self, accelerator, model: nn.Module, optimizer, *, loss_of: Callable[[dict], torch.Tensor],
                 scheduler: SchedulerOptions, total_steps: int, max_grad_norm: float | None, skip_nonfinite: bool,
                 wants_grad_norm: Callable[[], bool], before_step: Callable[[], None]):
        self.accelerator, self.model, self.loss_of = accelerator, model, loss_of
        self.max_grad_norm, self.skip_nonfinite = max_grad_norm, skip_nonfinite
        self.wants_grad_norm, self.before_step = wants_grad_norm, before_step
        self.direct = should_step_optimizer_directly(accelerator)
        # Whole local gradients (no sharding, no grad scaler; with DDP already all-reduced): their
        # norm is measured without clip_grad_norm_'s clipping pass, a multiplication by 1.
        self._plain_grads = self.direct and accelerator.distributed_type != DistributedType.FSDP and not _has_dtensors(model)
        self._trained = [p for p in model.parameters() if p.requires_grad]
        stepped = optimizer.optimizer if self.direct else optimizer
        # Built on the optimizer that is stepped: the schedule hooks that optimizer's step().
        self.scheduler = build_scheduler(scheduler, stepped, total_steps)
        self._step, self._zero_grad = stepped.step, stepped.zero_grad
        self.micro_batch = self._whole_step if steps_every_micro_batch(accelerator) else self._accumulated
        self.completed = True  # whether the latest micro-batch ended an optimizer step
        self.skipped = False  # whether that step was skipped for non-finite gradients
        self.grad_norm: torch.Tensor | None = None  # the latest measured norm, until taken

    def _whole_step(self, batch: dict) -> torch.Tensor:
        loss = self.loss_of(batch)
        loss.backward()
        self._update()
        return loss

    def _accumulated(self, batch: dict) -> torch.Tensor:
        with self.accelerator.accumulate(self.model):
            loss = self.loss_of(batch)
            self.accelerator.backward(loss)
            self.completed = self.accelerator.sync_gradients
            if self.completed:
                self._update()
        return loss

    def _update(self) -> None:
        if self.max_grad_norm:
            self.grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        elif self.skip_nonfinite or self.wants_grad_norm():
            # Without clipping the norm is still measured, but only on the steps that need it.
            self.grad_norm = self._measured_norm()
        # The skip policy's host sync: the norm of the all-reduced gradients is the same on
        # every process, so they all skip the same steps.
        self.skipped = self.skip_nonfinite and not torch.isfinite(self.grad_norm).item()
        if not self.skipped:
            self.before_step()
            self._step()
            # An fp16 overflow (the grad scaler skipped the step) leaves the schedule alone too.
            if self.direct or not self.accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
        self._zero_grad(set_to_none=True)

    def _measured_norm(self) -> torch.Tensor:
        """The gradients' total norm, the one clip_grad_norm_ returns; plain gradients skip its
        clipping pass (with an infinite bound it took 250 us inside a tiny workload's step)."""
        if self._plain_grads:
            return torch.nn.utils.get_total_norm([p.grad for p in self._trained if p.grad is not None])
        return self.accelerator.clip_grad_norm_(self.model.parameters(), float("inf"))

    def take_grad_norm(self) -> float | None:
        """The norm measured since the last call, or None."""
        norm, self.grad_norm = self.grad_norm, None
        return None if norm is None else float(norm)


def _has_dtensors(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (sharded by fully_shard); none can be before torch's
    distributed tensors are imported."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters())
