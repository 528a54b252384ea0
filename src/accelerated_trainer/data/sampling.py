"""Row order: a pure function of (seed, epoch), resumable from any position within the epoch."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Row order as a pure function of (seed, epoch), from a position within the epoch.

    `start` is the number of samples of this epoch already consumed by all processes
    together: a resume serves the rest of the same permutation, which accelerate then shards
    over however many processes there are now, so no sample is repeated or skipped.

    With several processes the epoch is padded (with its own first rows) or, with drop_last,
    cut to whole rounds of `batch_size x processes`, so every process gets full batches. The
    sampler does this rather than accelerate's `even_batches`, which pads from wherever the
    iteration began and so would pad differently after a mid-epoch resume.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool, round_size: int = 1, drop_last: bool = False):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.round_size, self.drop_last = round_size, drop_last
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> torch.Tensor:
        """The whole epoch's row order (int64), padded or cut to whole rounds."""
        if not self.shuffle:
            order = torch.arange(self.num_rows)
        else:
            # SeedSequence mixes (seed, epoch): seed 43 epoch 0 is not seed 42 epoch 1.
            mixed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0])
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(mixed))
        length = self.epoch_length()
        return order[:length] if length <= len(order) else order.repeat(-(-length // len(order)))[:length]

    def remaining(self) -> torch.Tensor:
        """The rows of this epoch not yet consumed, in order (a view of the permutation)."""
        return self.permutation()[self.start:]

    def epoch_length(self) -> int:
        rounds = self.num_rows // self.round_size if self.drop_last else -(-self.num_rows // self.round_size)
        return self.num_rows if self.round_size == 1 and not self.drop_last else rounds * self.round_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.remaining().tolist())

    def __len__(self) -> int:
        return self.epoch_length() - self.start
