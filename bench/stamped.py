"""The model every step bench trains: an MLP whose forward records the clock.

A step is timed forward to forward from these stamps, inside the process that trains, so the
same figure comes out of a hand-written loop, a framework, or a launched job of several
processes. bench_step.py and bench_async_save.py build `MLP` in process; bench_ddp.py's jobs
(the plain accelerate script and train.py, through `model_options.name: "stamped:LaunchedMLP"`)
build `LaunchedMLP`, which writes its stamps to a file, as a launched process has no other way
to hand them back.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import torch
from torch import nn


class MLP(nn.Module):
    """Linear and GELU layers; each forward records its start time in `stamps`, and the CPU
    time too in `cpu_stamps` for the forwards numbered in `cpu_at`.

    CPU time only where needed: process_time() is a system call, and py-spy over-samples frames
    that make one, which would distort profile_step.py's shares.
    """

    def __init__(self, dims: list[int], cpu_at: tuple[int, ...] = ()):
        super().__init__()
        layers: list[nn.Module] = []
        for width, out in itertools.pairwise(dims[:-1]):
            layers += [nn.Linear(width, out), nn.GELU()]
        layers.append(nn.Linear(dims[-2], dims[-1]))
        self.net = nn.Sequential(*layers)
        self.stamps: list[float] = []
        self.cpu_stamps: dict[int, float] = {}
        self._cpu_at = frozenset(cpu_at)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if len(self.stamps) in self._cpu_at:
            self.cpu_stamps[len(self.stamps)] = time.process_time()
        self.stamps.append(time.perf_counter())
        return self.net(features)


class LaunchedMLP(MLP):
    """The MLP of a launched job: on rank 0, once it has made `total` forwards, it writes
    {"wall": [stamps], "cpu": {forward: CPU time}} to `stamps_to` as JSON.

    Written right after the last stamp, not at exit: train.py leaves a run of several processes
    with os._exit, which skips atexit hooks. The write falls after the window's end, so it is
    never timed. A run that makes fewer forwards writes nothing, which the bench reports.
    """

    def __init__(self, dims: list[int], total: int, stamps_to: str, cpu_at: tuple[int, ...] = ()):
        super().__init__(dims, cpu_at)
        self._total = total
        # RANK is set by torch's launcher (what accelerate launch runs); absent for one process.
        self._stamps_to = Path(stamps_to) if int(os.environ.get("RANK", "0")) == 0 else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = super().forward(features)
        if self._stamps_to is not None and len(self.stamps) == self._total:
            self._stamps_to.write_text(json.dumps({"wall": self.stamps, "cpu": self.cpu_stamps}))
        return out
