"""A whole batch per call: one gather per batch key, never a dict per row.

Fixed-width numeric columns (scalars, fixed-size lists, lists of one length) are served from
one contiguous array per batch key, and a batch is one `index_select` per key, close to the
speed of indexing a tensor already in memory. The array is, in order of preference:

  - the column's own Arrow buffer, when it is one chunk of the batch dtype (zero-copy, and
    memory-mapped when the dataset comes from files);
  - a copy in RAM, while all copies together stay within `preload_max_mb`;
  - beyond that, for data read from files, a copy written once next to the dataset in the
    datasets cache and memory-mapped: data larger than RAM still works, pages are shared by
    the processes of a node, and a later run reuses the file.

Anything else (in-memory data beyond the budget) is gathered with one Arrow `take` per batch.
Datasets' own files hold many record batches (chunks), and Arrow's take across chunks is
slower than the per-row path, which is why the contiguous copies exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.types as types
import torch

from ..config import TORCH_DTYPES
from .sources import DataError

DTYPES = {name: getattr(torch, name) for name in TORCH_DTYPES}  # config names to torch dtypes
NUMPY_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64, np.dtype(np.float16): torch.float16,
                  np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.int16): torch.int16,
                  np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}
TORCH_TO_NUMPY = {torch_dtype: numpy_dtype for numpy_dtype, torch_dtype in NUMPY_TO_TORCH.items()}


class ColumnarBatches(torch.utils.data.Dataset):
    """Rows of an Arrow table served a whole batch at a time.

    `__getitems__` is the hook torch's DataLoader calls with a batch's index list. A batch is a
    dict: `features` (the feature columns, stacked along dim 1 when there are several), one
    entry per input column, and `labels`. `__getitem__` serves single rows for the per-row
    path (`vectorization: false`).

    Args:
        dataset: a datasets.Dataset without an indices mapping, or a pyarrow Table.
        feature_columns: columns stacked into `features`; empty for none.
        label_column: the column served as `labels`; None for batches without labels.
        label_dtype: the dtype of `labels` unless `dtypes` names another.
        input_columns: columns served under their own names (keyword arguments of the model).
        dtypes: dtype by batch key; features default to float32, input columns to int64,
            float32 or bool by their kind.
        preload_max_bytes: how much may be copied into contiguous tensors.
    Raises:
        DataError: a column holds something other than numbers, missing values, or lists of
            different lengths.
    """

    def __init__(self, dataset, feature_columns: Sequence[str], label_column: str | None, label_dtype: torch.dtype, *,
                 input_columns: Sequence[str] = (), dtypes: dict[str, torch.dtype] | None = None,
                 preload_max_bytes: int = 4096 << 20):
        table = dataset if isinstance(dataset, pa.Table) else dataset.data.table
        dtypes = dtypes or {}
        plan = {}  # batch key -> (columns, row shape, dtype)
        if feature_columns:
            plan["features"] = (list(feature_columns), _stacked_shape(table, feature_columns), dtypes.get("features", torch.float32))
        for name in input_columns:
            plan[name] = ([name], _row_shape(table, name), dtypes.get(name, _input_dtype(table.schema.field(name).type)))
        if label_column is not None:
            plan["labels"] = ([label_column], _row_shape(table, label_column), dtypes.get("labels", label_dtype))

        self._num_rows = table.num_rows
        self._dense: dict[str, torch.Tensor] = {}
        self._arrow: dict[str, tuple[list[str], tuple[int, ...], torch.dtype]] = {}
        budget = preload_max_bytes
        for key, (columns, shape, dtype) in plan.items():
            tensor = _in_place(table, columns, shape, dtype)
            size = self._num_rows * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if tensor is None and size <= budget:
                tensor, budget = _copy(table, columns, shape, dtype), budget - size
            if tensor is None:
                tensor = _memory_mapped_copy(dataset, table, columns, shape, dtype)
            if tensor is not None:
                self._dense[key] = tensor
            else:
                self._arrow[key] = (columns, shape, dtype)
        self._keys = list(plan)
        self._table = table.select(list(dict.fromkeys(c for columns, _, _ in self._arrow.values() for c in columns)))

    def __len__(self) -> int:
        return self._num_rows

    def take(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        rows = self._table.take(pa.array(index.numpy())) if self._arrow else None
        batch = {}
        for key in self._keys:
            if key in self._dense:
                batch[key] = self._dense[key].index_select(0, index)
            else:
                columns, shape, dtype = self._arrow[key]
                row_shape = shape[1:] if len(columns) > 1 else shape  # stacked columns: (n, *row)
                batch[key] = _stack([_to_numpy(rows.column(c), row_shape) for c in columns], dtype)
        return batch

    __getitems__ = take

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.take([index]).items()}

    @property
    def row_bytes(self) -> int | None:
        """The bytes of one row's batch entries; rows taken together are the batches taken one by one."""
        shapes = [(tuple(value.shape[1:]), value.dtype) for value in self._dense.values()]
        shapes += [(shape, dtype) for _, shape, dtype in self._arrow.values()]  # a row's shape, stacked columns included
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in shapes)

    @property
    def preloaded(self) -> list[str]:
        """Batch keys served from contiguous tensors (the rest come from Arrow per batch)."""
        return list(self._dense)


class RowByRow(ColumnarBatches):
    """The per-row path: torch's fetcher asks for rows one by one and a collate function stacks them."""

    __getitems__ = None


# ---------------------------------------------------------------- column layout


def _row_shape(table: pa.Table, name: str) -> tuple[int, ...]:
    """The shape of one row of a numeric column: () for scalars, (n, ...) for lists of one length."""
    column = table.column(name)
    if column.null_count:
        raise DataError(f"column {name!r} has {column.null_count} missing values; fill or drop them (dataset_options.transforms).")
    shape: list[int] = []
    kind, chunks = column.type, [chunk for chunk in column.chunks if len(chunk)]
    while types.is_list(kind) or types.is_large_list(kind) or types.is_fixed_size_list(kind):
        if types.is_fixed_size_list(kind):
            width = kind.list_size
        else:
            lengths = np.unique(np.concatenate([np.diff(chunk.offsets.to_numpy()) for chunk in chunks] or [np.zeros(0, np.int64)]))
            if len(lengths) > 1:
                raise DataError(f"column {name!r} holds lists of different lengths ({lengths.min()} to {lengths.max()}); "
                                "pad them to one length in a transform (e.g. a tokenizer with padding='max_length'), "
                                "or let dataset_options.text pack token ids into blocks.")
            width = int(lengths[0]) if len(lengths) else 0
        if any(chunk.flatten().null_count for chunk in chunks):
            raise DataError(f"column {name!r} has missing values inside its lists; fill or drop them.")
        shape.append(width)
        kind, chunks = kind.value_type, [chunk.flatten() for chunk in chunks]
    _natural_dtype(kind, name)
    return tuple(shape)


def _stacked_shape(table: pa.Table, columns: Sequence[str]) -> tuple[int, ...]:
    shapes = {name: _row_shape(table, name) for name in columns}
    if len(set(shapes.values())) > 1:
        raise DataError(f"dataset_options.feature_columns: the columns have different row shapes {shapes}; "
                        "stack columns of one shape, or pass them as dataset_options.input_columns.")
    shape = next(iter(shapes.values()))
    return shape if len(columns) == 1 else (len(columns), *shape)


def _input_dtype(kind: pa.DataType) -> torch.dtype:
    # int64 is what embeddings and transformers models expect of ids and masks, whatever the file stored.
    natural = _natural_dtype(kind)
    if natural == torch.bool:
        return torch.bool
    return torch.float32 if natural.is_floating_point else torch.int64


def _natural_dtype(kind: pa.DataType, name: str = "") -> torch.dtype:
    while types.is_list(kind) or types.is_large_list(kind) or types.is_fixed_size_list(kind):
        kind = kind.value_type
    if types.is_boolean(kind):
        return torch.bool
    if types.is_integer(kind) or types.is_floating(kind):
        return NUMPY_TO_TORCH.get(np.dtype(kind.to_pandas_dtype()), torch.int64)
    raise DataError(f"column {name!r} holds {kind}, not numbers; turn it into numbers with dataset_options.transforms "
                    "(or dataset_options.text for text).")


def _flat_values(chunk: pa.Array, depth: int) -> pa.Array:
    for _ in range(depth):
        chunk = chunk.flatten()
    return chunk


# ---------------------------------------------------------------- column to tensor


def _in_place(table: pa.Table, columns: list[str], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor over the column's own Arrow buffer, if it is one chunk of exactly this dtype."""
    if len(columns) != 1 or table.column(columns[0]).num_chunks != 1:
        return None
    values = _flat_values(table.column(columns[0]).chunk(0), len(shape))
    if values.null_count or types.is_boolean(values.type) or NUMPY_TO_TORCH.get(np.dtype(values.type.to_pandas_dtype())) != dtype:
        return None
    with warnings.catch_warnings():  # read-only Arrow memory: batches are index_select copies, never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values.to_numpy(zero_copy_only=True).reshape(table.num_rows, *shape))


def _copy(table: pa.Table, columns: list[str], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The columns in one contiguous tensor in RAM."""
    return _fill(torch.empty((table.num_rows, *shape), dtype=dtype), table, columns)


def _memory_mapped_copy(dataset, table: pa.Table, columns: list[str], shape: tuple[int, ...],
                        dtype: torch.dtype) -> torch.Tensor | None:
    """The columns in a contiguous .npy file next to the dataset's cache files, memory-mapped.

    The name hashes the dataset fingerprint, the columns and the dtype, so a later run (or
    another process) reuses the file; it appears by an atomic rename, never half-written.
    None for in-memory data, bfloat16 (numpy has none), or a cache directory that is not writable.
    """
    files = getattr(dataset, "cache_files", None)
    if not files or dtype not in TORCH_TO_NUMPY:
        return None
    key = json.dumps([dataset._fingerprint, columns, list(shape), str(dtype)])
    path = Path(files[0]["filename"]).parent / f"columns-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    try:
        if not path.is_file():
            partial = path.with_name(f"{path.stem}-{os.getpid()}.partial.npy")
            array = np.lib.format.open_memmap(partial, mode="w+", dtype=TORCH_TO_NUMPY[dtype], shape=(table.num_rows, *shape))
            _fill(torch.from_numpy(array), table, columns)
            array.flush()
            del array
            os.replace(partial, path)
        array = np.load(path, mmap_mode="r")
    except OSError:
        return None
    return _tensor(array)


def _fill(out: torch.Tensor, table: pa.Table, columns: list[str]) -> torch.Tensor:
    """Copy the columns into `out` chunk by chunk (the cast happens in the copy), stacked on dim 1 if several."""
    row_shape = tuple(out.shape[2:] if len(columns) > 1 else out.shape[1:])
    for position, name in enumerate(columns):
        target = out[:, position] if len(columns) > 1 else out
        start = 0
        for chunk in table.column(name).chunks:
            target[start:start + len(chunk)] = _tensor(_to_numpy(chunk, row_shape))
            start += len(chunk)
    return out


def _to_numpy(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return _flat_values(column, len(shape)).to_numpy(zero_copy_only=False).reshape(len(column), *shape)


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype not in NUMPY_TO_TORCH:  # uint16/32/64: torch has no general support for them
        array = array.astype(np.int64)
    with warnings.catch_warnings():  # Arrow's buffers are read-only to numpy; torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _stack(arrays: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    if len(arrays) == 1:
        return _tensor(arrays[0]).to(dtype)
    return torch.stack([_tensor(array).to(dtype) for array in arrays], dim=1)
