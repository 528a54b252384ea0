"""data sources: Arrow files, save_to_disk directories, text files, in-memory tables, a test split,
and every source trained on end to end."""

import datasets
import pyarrow as pa
import pytest
import torch

from accelerated_trainer import AcceleratedTrainer, data
from accelerated_trainer.config import DatasetOptions

from conftest import digits_config
from test_data import ROWS, WRITERS, isolated_datasets_cache, options, write_csv  # noqa: F401  (autouse fixture)


def rows_table(rows=ROWS) -> pa.Table:
    a, b, c, label = (list(values) for values in zip(*rows))
    return pa.table({"a": pa.array(a, pa.float64()), "b": pa.array(b, pa.float64()), "c": pa.array(c, pa.float64()),
                     "label": pa.array(label, pa.int64())})


def write_arrow(path, rows=ROWS):
    with pa.ipc.new_stream(str(path), rows_table(rows).schema) as writer:
        writer.write_table(rows_table(rows))
    return path


def write_saved(path, rows=ROWS):
    datasets.Dataset(rows_table(rows)).save_to_disk(str(path))
    return path


def features_of(split) -> list[list[float]]:
    rows = data.ColumnarBatches(split, ["a", "b", "c"], "label", torch.long)
    return rows.take(list(range(len(rows))))["features"].tolist()


EXPECTED = [list(row[:3]) for row in ROWS]


@pytest.mark.parametrize("write", [write_arrow, write_saved], ids=["arrow", "save_to_disk"])
def test_arrow_file_and_saved_directory_load_rows_in_order(tmp_path, write):
    path = write(tmp_path / ("train.arrow" if write is write_arrow else "saved"))
    splits = data.load_splits(options({"train": str(path)}, validation_split=0.0), seed=0)
    assert features_of(splits.train) == EXPECTED
    assert splits.train["label"] == [row[3] for row in ROWS]


def test_saved_dataset_dict_gives_each_split_its_own_rows(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset(rows_table(ROWS[:3])),
                          "validation": datasets.Dataset(rows_table(ROWS[3:]))}).save_to_disk(str(saved))
    splits = data.load_splits(options({"train": str(saved), "validation": str(saved)}), seed=0)
    assert features_of(splits.train) == EXPECTED[:3]
    assert features_of(splits.validation) == EXPECTED[3:]

    with pytest.raises(data.DataError, match=r"dataset_options\.data_files\.test.*\['train', 'validation'\].*'test'"):
        data.load_splits(options({"train": str(saved), "test": str(saved)}), seed=0)


def test_glob_of_saved_directories_concatenates_them(tmp_path):
    write_saved(tmp_path / "shard-0", ROWS[:2])
    write_saved(tmp_path / "shard-1", ROWS[2:])
    splits = data.load_splits(options({"train": str(tmp_path / "shard-*")}, validation_split=0.0), seed=0)
    assert features_of(splits.train) == EXPECTED


def test_directory_not_written_by_save_to_disk_is_named(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(data.DataError, match=r"dataset_options\.data_files\.train.*plain.*save_to_disk"):
        data.load_splits(options({"train": str(tmp_path / "plain")}), seed=0)


def test_files_and_directories_cannot_be_mixed(tmp_path):
    files = {"train": [str(write_saved(tmp_path / "saved")), str(write_csv(tmp_path / "t.csv"))]}
    with pytest.raises(data.DataError, match="not both"):
        data.load_splits(options(files), seed=0)


def test_test_split_is_loaded_and_checked(tmp_path):
    files = {"train": str(write_csv(tmp_path / "train.csv")), "test": str(write_csv(tmp_path / "test.csv", ROWS[:2]))}
    splits = data.load_splits(options(files, validation_split=0.0), seed=0)
    assert features_of(splits.test) == EXPECTED[:2] and splits.validation is None

    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,0\n")
    with pytest.raises(data.DataError, match=r"'c' is not in the test data"):
        data.load_splits(options({**files, "test": str(tmp_path / "bad.csv")}), seed=0)


@pytest.mark.parametrize("sample_by, rows", [("document", ["one\ntwo\n", "three"]), ("line", ["one\n", "two\n", "three"])])
def test_text_files_load_by_document_or_by_line_keeping_line_breaks(tmp_path, sample_by, rows):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("three")
    opts = DatasetOptions(data_files={"train": str(tmp_path / "*.txt")}, feature_columns=["text"], label_column="text",
                          text={"sample_by": sample_by}, validation_split=0.0)
    raw = data.sources.load_file_split(opts, "train")
    assert raw["text"] == rows


def test_in_memory_arrow_table_is_accepted():
    splits = data.load_splits(options({}, validation_split=0.0), seed=0, train_dataset=rows_table())
    assert features_of(splits.train) == EXPECTED


def test_unsupported_in_memory_data_names_the_accepted_kinds():
    with pytest.raises(TypeError, match="datasets.Dataset, a dict of columns or a pyarrow Table"):
        data.load_splits(options({}), seed=0, train_dataset=[{"a": 1.0}])


# ---------------------------------------------------------------- every source into training


def separable_rows(n=96):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=generator)
    labels = (x[:, 0] + x[:, 1] > 0).long()
    return [(*map(float, row), int(label)) for row, label in zip(x.tolist(), labels)]


SOURCES = {
    **{fmt: lambda tmp, rows, fmt=fmt, write=write: {"train": str(write(tmp / f"train.{fmt}", rows))} for fmt, write in WRITERS.items()},
    "arrow": lambda tmp, rows: {"train": str(write_arrow(tmp / "train.arrow", rows))},
    "save_to_disk": lambda tmp, rows: {"train": str(write_saved(tmp / "saved", rows))},
    "dict": lambda tmp, rows: {k: list(v) for k, v in rows_table(rows).to_pydict().items()},
    "Dataset": lambda tmp, rows: datasets.Dataset(rows_table(rows)),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_source_trains_end_to_end(tmp_path, source):
    rows = separable_rows()
    given = SOURCES[source](tmp_path, rows)
    in_memory = not (isinstance(given, dict) and "train" in given)
    config = digits_config(tmp_path, dataset_options={"data_files": {} if in_memory else given, "feature_columns": ["a", "b", "c"],
                                                      "validation_split": 0.25, "batch_size": 16},
                           training_options={"n_epochs": 3, "monitor": "val_loss", "save_top_k": 0},
                           model_options={"name": "mlp", "kwargs": {"hidden_dims": [16]}})
    trainer = AcceleratedTrainer(None, config, train_dataset=given if in_memory else None)
    result = trainer.train()

    assert result.steps == 3 * 5  # 72 training rows in batches of 16
    assert trainer.config.model_options.kwargs["input_dim"] == 3 and trainer.config.model_options.kwargs["output_dim"] == 2
    assert set(result.metrics) == {"val_loss", "val_accuracy"}
    # What the loader served is what the source holds: 72 distinct written rows (float32), each once.
    served = [tuple(row) for batch in trainer.train_loader for row in batch["features"].tolist()]
    written = {tuple(torch.tensor(row[:3]).tolist()) for row in rows}
    assert len(served) == len(set(served)) == 72 and set(served) <= written
