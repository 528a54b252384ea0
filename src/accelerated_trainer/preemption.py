"""Preemption: a signal or a wall-clock budget asks every process to stop after the same step.

A scheduler (SLURM, Kubernetes) sends SIGTERM or SIGUSR1 before it kills a job; the trainer
then finishes its optimizer step, writes a complete `last` checkpoint and returns a result
marked `preempted` (the CLI exits with 99), and the next launch resumes from it.

Processes may see the signal at different steps, so the decision is agreed: every process
contributes its flag to a MAX all-reduce at the same steps. On GPUs the reduction issued at step
k is read at step k+1, so the host never waits on the step it just queued. On CPU (gloo) it is
read at once, and not at every step: the processes reduce the slowest step time with the flag
and agree again after as many steps as take AGREE_EVERY_S, so a stop comes that much later at
most and small steps do not pay a collective each. Every process reads the same value at the
same step, which is what keeps their collectives in lockstep.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a run starts, not by the command line's early hold()
    import torch

    from .early_stopping import Stop

INTERRUPTED = "interrupted by Ctrl-C (SIGINT)"
AGREE_EVERY_S = 0.05  # gloo: how often processes agree on a stop, at most 50 steps apart
AGREE_MAX_STEPS = 50


# Signals that arrived while no StopRequest was installed (held since the command line started).
_held: list[str] = []


def hold(signals: list[str]) -> None:
    """Record these signals instead of dying of them, from now until the process exits.

    The command line calls it as soon as the config is read: a scheduler's SIGTERM during the
    set-up (imports, data loading) is then honoured by the StopRequest once training starts, and
    one after training (while trackers close) no longer kills a run whose checkpoints are written.
    """
    for name in signals:
        if name != "SIGINT":  # Ctrl-C during the set-up stops it at once, as usual
            signal.signal(getattr(signal, name), lambda number, frame: _held.append(signal.Signals(number).name))


OUT_OF_TIME = "max_time_s reached"


class StopRequest:
    """Collects stop requests (signals, Ctrl-C, the time budget) and agrees on them across processes.

    The first Ctrl-C (SIGINT) stops like a preemption: the step finishes, `last` is saved; a
    second one interrupts at once (KeyboardInterrupt).
    """

    def __init__(self, accelerator, signals: list[str], max_time_s: float | None):
        self.accelerator = accelerator
        self.signal_names = list(dict.fromkeys([*signals, "SIGINT"]))
        self.deadline = None if max_time_s is None else time.monotonic() + max_time_s
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None
        # gloo's agreement: steps counted, the next step to agree at, when the last agreement was.
        self._steps = self._agreed_step = 0
        self._agree_at = 1
        self._agreed_time = time.monotonic()

    def install(self) -> None:
        for name in self.signal_names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._on_signal)
        if _held:
            self.received = _held[0]
            _held.clear()

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _on_signal(self, number: int, frame) -> None:
        # Only record it: the step in progress finishes, then the trainer saves and stops.
        # A second signal (the launcher forwarding what the scheduler also sent) changes nothing,
        # but for a second Ctrl-C, which interrupts at once.
        name = signal.Signals(number).name
        if name == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.received = self.received or name

    def _local_reason(self) -> str | None:
        if self.received == "SIGINT":
            return INTERRUPTED
        if self.received:
            return f"preempted by {self.received}"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return OUT_OF_TIME
        return None

    def should_stop(self) -> Stop | None:
        """The agreed Stop (preempted), or None. Call once per optimizer step on every process."""
        reason = self._agreed_reason()
        if reason is None:
            return None
        from .early_stopping import Stop

        return Stop(reason, preempted=True, interrupted=reason == INTERRUPTED, by_signal=reason != OUT_OF_TIME)

    def _agreed_reason(self) -> str | None:
        if self.accelerator.num_processes == 1:
            return self._local_reason()
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "gloo":
            return self._agreed_on_cpu(torch, dist)
        flag = torch.tensor([self._code()], dtype=torch.float32, device=self.accelerator.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        agreed, self._pending = self._pending, (work, flag)
        if agreed is None:
            return None
        agreed[0].wait()
        return self._reason_of(int(agreed[1].item()))

    def _agreed_on_cpu(self, torch, dist) -> str | None:
        # A blocking reduction: no asynchronous gloo work is left in flight beside the step's
        # other collectives. Every process counts the same steps, so they all reduce at the same ones.
        self._steps += 1
        if self._steps < self._agree_at:
            return None
        now = time.monotonic()
        per_step = (now - self._agreed_time) / (self._steps - self._agreed_step)
        flag = torch.tensor([self._code(), per_step], dtype=torch.float64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code, slowest = int(flag[0]), float(flag[1])
        self._agreed_step, self._agreed_time = self._steps, now
        self._agree_at = self._steps + max(1, min(AGREE_MAX_STEPS, int(AGREE_EVERY_S / max(slowest, 1e-6))))
        return self._reason_of(code)

    def _reason_of(self, code: int) -> str | None:
        if code == 0:
            return None
        if code == 1:
            return OUT_OF_TIME
        return self._local_reason() if self.received else "preempted by a signal another process received"

    def _code(self) -> int:
        if self.received:
            return 2
        return 1 if self._local_reason() else 0

    def drain(self) -> None:
        """Complete an outstanding reduction so no collective is left half issued."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
