"""What the data must hold before training: the configured columns, finite numbers, class labels
in range; and the sizes built-in models take from it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import DatasetOptions
from ..loss import IGNORE_INDEX
from .batches import _stacked_shape
from .padding import MASK
from .sources import DataError
from .torch_data import TorchSplit


def check_columns(dataset, options: DatasetOptions, split: str, source: str, require_labels: bool = True) -> None:
    """The configured columns are there and hold finite numbers; without `require_labels` the
    label column may be missing (data to predict)."""
    # The attention mask of tokenized rows is made per batch (padding.py), not stored.
    inputs = [name for name in options.input_columns if not (options.text is not None and name == MASK)]
    labels = [options.label_column] if require_labels or options.label_column in dataset.column_names else []
    keys = [("feature_columns", options.feature_columns), ("input_columns", inputs), ("label_column", labels)]
    for key, columns in keys:
        for column in columns:
            if column not in dataset.column_names:
                raise DataError(
                    f"dataset_options.{key}: column {column!r} is not in the {split} data from {source}; "
                    f"its columns are {dataset.column_names}."
                )
    if len(dataset) == 0:
        raise DataError(f"the {split} split from {source} is empty.")
    for key, columns in keys:
        for column in columns:
            _check_finite(dataset.data.table.column(column), f"dataset_options.{key}", column, split, source)


def _check_finite(column: pa.ChunkedArray, key: str, name: str, split: str, source: str) -> None:
    """NaN, inf or missing values in a numeric column: an error before training, not a NaN loss later."""
    count, first, offset = 0, None, 0
    for chunk in column.chunks:  # chunk by chunk: a memory-mapped column is never copied whole
        bad, width = _not_finite(chunk)
        found = 0 if bad is None else pc.sum(bad).as_py() or 0
        if found and first is None:
            first = offset + pc.index(bad, True).as_py() // width
        count, offset = count + found, offset + len(chunk)
    if count:
        raise DataError(
            f"{key}: column {name!r} of the {split} data from {source} has {count} NaN, infinite or missing "
            f"value(s), the first in row {first}; clean or impute them before training."
        )


def _not_finite(values: pa.Array) -> tuple[pa.Array | None, int]:
    """A mask of the chunk's NaN, infinite or missing numbers (lists flattened) and the values per row;
    None for non-numeric data and for missing lists, which the loader names itself."""
    rows = len(values)
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        if values.null_count:
            return None, 1
        values = pc.list_flatten(values)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        return None, 1
    bad = pc.invert(pc.fill_null(pc.is_finite(values), False)) if pa.types.is_floating(values.type) else pc.is_null(values)
    return bad, max(len(values) // max(rows, 1), 1)


def describe(dataset, options: DatasetOptions, task: str, validation=None) -> dict[str, int]:
    """What built-in models size themselves from: input_dim (features per example), and for
    class labels num_classes; for language_modeling also vocab_size and block_size.

    The number of classes is the label feature's ClassLabel size when it has one, else the
    largest label + 1; `validation`, when given, must hold no label outside that range.

    Raises:
        DataError: a class label that is negative, not an integer, or outside the class range.
    """
    if isinstance(dataset, TorchSplit):  # torch data is not scanned: only what its first batch shows
        return {} if dataset.layout.input_dim is None else {"input_dim": dataset.layout.input_dim}
    table = dataset.data.table
    info = {}
    if options.feature_columns:
        info["input_dim"] = int(np.prod(_stacked_shape(table, options.feature_columns)))
    if task in ("classification", "language_modeling"):
        info["num_classes"] = _num_classes(dataset, options.label_column, validation)
    if task == "language_modeling":
        info["vocab_size"] = info["num_classes"]
        if options.feature_columns:
            _, highest = _class_range(table.column(options.feature_columns[0]), options.feature_columns[0], "train")
            info["vocab_size"] = max(info["vocab_size"], highest + 1)
        info["block_size"] = int(np.prod(_stacked_shape(table, [options.label_column])))
    return info


def label_names(dataset, options: DatasetOptions) -> list[str] | None:
    """The class names of the label's ClassLabel feature (text labels, or declared), or None."""
    if isinstance(dataset, TorchSplit) or options.label_column not in dataset.features:
        return None
    return getattr(dataset.features[options.label_column], "names", None)


def _num_classes(dataset, column: str, validation) -> int:
    feature = dataset.features[column]
    while hasattr(feature, "feature"):  # List(ClassLabel) for per-position labels
        feature = feature.feature
    declared = getattr(feature, "num_classes", None)
    _, highest = _class_range(dataset.data.table.column(column), column, "train")
    num_classes = declared or highest + 1
    for split, data in (("train", dataset), ("validation", validation)):
        if data is None:
            continue
        _, highest = _class_range(data.data.table.column(column), column, split)
        if highest >= num_classes:
            origin = f"its ClassLabel feature declares {declared}" if declared else "the training labels hold classes 0 to " \
                     f"{num_classes - 1}"
            raise DataError(f"dataset_options.label_column: column {column!r} of the {split} data holds the class "
                            f"{highest}, outside the class range ({origin}).")
    return num_classes


def _class_range(values, column: str, split: str) -> tuple[int, int]:
    """(lowest, highest) class index in a label column, skipping IGNORE_INDEX; checks they are indices."""
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = pc.list_flatten(values)
    if pa.types.is_floating(values.type):
        if not pc.all(pc.equal(pc.floor(values), values)).as_py():
            raise DataError(f"dataset_options.label_column: column {column!r} of the {split} data holds non-integer "
                            "values; class labels are indices 0..C-1 (for real-valued targets set training_options.task "
                            "to regression).")
    values = pc.filter(values, pc.not_equal(values, IGNORE_INDEX))
    extremes = pc.min_max(values)
    lowest, highest = extremes["min"].as_py(), extremes["max"].as_py()
    if lowest is None:
        return 0, -1
    if lowest < 0:
        raise DataError(f"dataset_options.label_column: column {column!r} of the {split} data holds the class {lowest:g}; "
                        f"class labels are indices 0..C-1 ({IGNORE_INDEX} marks a position to ignore).")
    return int(lowest), int(highest)
