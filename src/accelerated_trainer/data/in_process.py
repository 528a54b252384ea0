"""Whole batches sliced straight from the sampler's order, for one process reading in its own thread.

torch's DataLoader and accelerate's DataLoaderShard add work to every batch that buys nothing
when one process reads its own data without workers: a fetcher, a profiler range, a Python
list of indices, a look-ahead batch and the gradient-state bookkeeping. On a small model that
is about a tenth of the step (bench/bench_step.py, bench/profile_step.py). This loader serves
the same batches (the sampler's order cut into batch_size slices) without them, and gathers
many batches at once: one gather per batch key for up to GATHER_BYTES of rows, then a view per
batch (11.0 against 6.5 us a batch on the tiny workload). With several processes, workers, or
the per-row path the trainer uses a DataLoader prepared by accelerate instead, which shards and
places the batches.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .batches import ColumnarBatches
from .sampling import EpochSampler

GATHER_BYTES = 4 << 20  # rows gathered at once: whole batches up to about this many bytes


class InProcessLoader:
    """An iterable of batches with the DataLoader interface the trainer uses.

    Args:
        rows: the columnar data.
        sampler: the row order; its `start` skips rows already consumed (mid-epoch resume).
        batch_size / drop_last: as for a DataLoader.
        device: where batches go; CPU batches are served as gathered.
    """

    def __init__(self, rows: ColumnarBatches, sampler: EpochSampler, batch_size: int, drop_last: bool, device: torch.device):
        self.dataset, self.sampler = rows, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.device = torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        rows = len(self.sampler)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.sampler.remaining()
        end = len(self) * self.batch_size if self.drop_last else len(order)
        per_gather = self.batch_size * self._batches_per_gather()
        for first in range(0, end, per_gather):
            last = min(first + per_gather, end)
            rows = self.dataset.take(order[first:last])
            if self.device.type != "cpu":
                rows = {key: value.to(self.device, non_blocking=True) for key, value in rows.items()}
            for begin in range(0, last - first, self.batch_size):
                yield {key: value[begin:begin + self.batch_size] for key, value in rows.items()}

    def _batches_per_gather(self) -> int:
        """1 where each batch must be gathered alone (padded to its own longest row)."""
        row_bytes = self.dataset.row_bytes
        if row_bytes is None:
            return 1
        return max(1, GATHER_BYTES // max(1, row_bytes * self.batch_size))
