"""Which columns are the features when the config leaves them out.

The original spec names no feature columns: the data's columns other than the label are the
features when that is unambiguous, one numeric column (an array or a scalar) or several scalar
columns (stacked into `(batch, n)`, the tabular case). Anything else is one error listing the
columns, since guessing would train on the wrong inputs silently. The same rule serves Arrow
columns and the keys of a torch dataset's dict items.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.types as types

from ..config import DatasetOptions
from .sources import DataError

SCALAR, ARRAY, OTHER = "a number", "an array of numbers", "no numbers"


def resolve(options: DatasetOptions, kinds: dict[str, str], where: str) -> DatasetOptions:
    """The options with feature_columns filled in from `kinds` ({column: SCALAR, ARRAY or OTHER}),
    when the config names neither feature nor input columns; else the options unchanged.

    Raises:
        DataError: the columns other than the label do not say which are the features.
    """
    if options.feature_columns or options.input_columns:
        return options
    candidates = {name: kind for name, kind in kinds.items() if name != options.label_column}
    kinds_seen = set(candidates.values())
    if (len(candidates) == 1 and kinds_seen != {OTHER}) or (len(candidates) > 1 and kinds_seen == {SCALAR}):
        return options.model_copy(update={"feature_columns": list(candidates)})
    listed = ", ".join(f"{name!r} ({kind})" for name, kind in candidates.items()) or "no column"
    raise DataError(
        f"dataset_options.feature_columns is not given, and which columns are the features is unclear from the {where} "
        f"(besides the label {options.label_column!r}: {listed}); features are one numeric column or several scalar "
        "columns (stacked). Name the model's first argument in dataset_options.feature_columns and its keyword inputs in "
        "dataset_options.input_columns."
    )


def kinds_of_table(schema: pa.Schema) -> dict[str, str]:
    """SCALAR, ARRAY or OTHER for each column of an Arrow schema."""
    kinds = {}
    for field in schema:
        kind, depth = field.type, 0
        while types.is_list(kind) or types.is_large_list(kind) or types.is_fixed_size_list(kind):
            kind, depth = kind.value_type, depth + 1
        numeric = types.is_integer(kind) or types.is_floating(kind) or types.is_boolean(kind)
        kinds[field.name] = OTHER if not numeric else ARRAY if depth else SCALAR
    return kinds
