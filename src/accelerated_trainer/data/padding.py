"""Rows of token ids of different lengths, each batch padded to its own longest row.

The token ids of a column live in one flat tensor with the rows' offsets beside it (Arrow's own
layout of a list column). A batch is then one gather for all its rows: the index matrix
`start of row + position` over the batch width, masked where a row has ended. No row is
padded alone and nothing is padded beyond the batch's longest row, rounded up to a multiple
of 8 (the width tensor cores and vectorized kernels like) but never past `max_length`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from .batches import ColumnarBatches
from .sources import DataError

MULTIPLE = 8
MASK = "attention_mask"


class PaddedBatches(ColumnarBatches):
    """Labels (and any fixed-width columns) as ColumnarBatches serves them, plus padded token
    columns and their `attention_mask` (1 for a token, 0 for padding).

    Args:
        dataset: a datasets.Dataset without an indices mapping.
        label_column / label_dtype: as for ColumnarBatches.
        padded: token column -> the value padding positions get (the tokenizer's pad id, 0 for
            token_type_ids); every one holds rows of the same lengths.
        max_length: the batch width never exceeds it (rows are truncated to it already).
        dtypes: dtype by batch key; token columns and the mask default to int64.
    """

    def __init__(self, dataset, label_column: str, label_dtype: torch.dtype, *, padded: dict[str, int], max_length: int,
                 dtypes: dict[str, torch.dtype] | None = None, preload_max_bytes: int = 4096 << 20):
        super().__init__(dataset, [], label_column, label_dtype, dtypes=dtypes, preload_max_bytes=preload_max_bytes)
        table = dataset.data.table
        dtypes = dtypes or {}
        self.max_length = max_length
        self._pads, self._values, self._dtypes = {}, {}, {MASK: dtypes.get(MASK, torch.long)}
        for name, pad in padded.items():
            offsets, values = _flat(table.column(name), name)
            if name == next(iter(padded)):
                self._starts, self._lengths = offsets[:-1], offsets[1:] - offsets[:-1]
            elif not torch.equal(offsets[1:] - offsets[:-1], self._lengths):
                raise DataError(f"column {name!r} has rows of other lengths than {next(iter(padded))!r}.")
            self._values[name], self._pads[name] = values, pad
            self._dtypes[name] = dtypes.get(name, torch.long)

    def take(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = super().take(indices)
        index = torch.as_tensor(indices, dtype=torch.long)
        lengths = self._lengths.index_select(0, index)
        longest = int(lengths.max()) if len(index) else 0
        width = min(-(-longest // MULTIPLE) * MULTIPLE, max(self.max_length, longest))
        positions = torch.arange(width)
        mask = positions < lengths[:, None]
        # Positions past a row's end read whatever follows it (clamped into range), then are overwritten.
        gather = self._starts.index_select(0, index)[:, None] + positions
        for name, values in self._values.items():
            gather = gather.clamp_(max=max(len(values) - 1, 0))
            batch[name] = values[gather].masked_fill_(~mask, self._pads[name]).to(self._dtypes[name])
        batch[MASK] = mask.to(self._dtypes[MASK])
        return batch

    __getitems__ = take
    row_bytes = None  # each batch is padded to its own longest row: gathered alone

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        raise TypeError("padded text batches are served whole (__getitems__); there is no per-row path")


def _flat(column: pa.ChunkedArray, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets of every row, int64; all values) of a list column, chunks joined."""
    lengths, values = [], []
    for chunk in column.chunks:
        if chunk.null_count:
            raise DataError(f"column {name!r} has missing rows.")
        offsets = chunk.offsets.to_numpy()
        lengths.append(np.diff(offsets))
        values.append(chunk.values.slice(offsets[0], offsets[-1] - offsets[0]).to_numpy(zero_copy_only=False))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(values) if values else np.zeros(0, np.int32)
    return torch.from_numpy(offsets), torch.from_numpy(np.ascontiguousarray(flat))
