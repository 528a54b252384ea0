"""Bad data: a clear error before training starts, naming the key, the column and the file."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from accelerated_trainer import AcceleratedTrainer, DataError

from conftest import DIGITS, digits_config


def digits_with(tmp_path, change):
    table = pq.read_table(DIGITS / "train.parquet").to_pydict()
    change(table)
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"pixels": pa.array(table["pixels"], pa.list_(pa.float32(), 64)), "label": table["label"]}), path)
    return path


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_feature_values_name_the_column_file_and_row(tmp_path, bad):
    path = digits_with(tmp_path, lambda t: t["pixels"][17].__setitem__(5, bad))
    config = digits_config(tmp_path)
    config["dataset_options"]["data_files"]["train"] = str(path)
    with pytest.raises(DataError) as err:
        AcceleratedTrainer(None, config)
    message = str(err.value)
    assert "dataset_options.feature_columns: column 'pixels'" in message and "train.parquet" in message
    assert "1 NaN, infinite or missing value(s), the first in row 17" in message
    assert not (tmp_path / "digits-mlp").exists()


def test_missing_column_and_empty_split(tmp_path):
    config = digits_config(tmp_path)
    config["dataset_options"]["label_column"] = "digit"
    with pytest.raises(DataError, match=r"dataset_options.label_column: column 'digit' is not in the train data"):
        AcceleratedTrainer(None, config)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(DIGITS / "train.parquet").slice(0, 0), empty)
    config = digits_config(tmp_path)
    config["dataset_options"]["data_files"]["train"] = str(empty)
    with pytest.raises(DataError, match="empty"):
        AcceleratedTrainer(None, config)
