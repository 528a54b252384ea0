"""data batches: where each column is gathered from, named inputs and dtypes, bad columns, label
ranges, resuming mid-epoch and sharding over two processes."""

import os

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from accelerate.data_loader import prepare_data_loader

from accelerated_trainer import data
from accelerated_trainer.config import ConfigError, DatasetOptions

from test_data import all_batches, digits, digits_options, isolated_datasets_cache  # noqa: F401  (fixtures)


def table_dataset(columns: dict, chunks: int = 1) -> datasets.Dataset:
    """An in-memory dataset whose Arrow table has `chunks` record batches."""
    table = pa.table(columns)
    if chunks > 1:
        table = pa.Table.from_batches(table.to_batches(max_chunksize=-(-table.num_rows // chunks)))
    return datasets.Dataset(table)


def batches_equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]) for key in left)


# ---------------------------------------------------------------- where columns are gathered from


def test_every_storage_path_serves_the_same_batches(digits, tmp_path):
    # digits' Arrow cache file holds several record batches, so no column can be used in place.
    assert digits.train.data.table.column("pixels").num_chunks > 1
    indices = torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(0))[:100].tolist()
    in_ram = data.ColumnarBatches(digits.train, ["pixels"], "label", torch.long)
    mapped = data.ColumnarBatches(digits.train, ["pixels"], "label", torch.long, preload_max_bytes=0)
    in_memory = datasets.Dataset(pa.Table.from_batches(digits.train.data.table.to_batches()))  # no cache files
    arrow = data.ColumnarBatches(in_memory, ["pixels"], "label", torch.long, preload_max_bytes=0)

    assert in_ram.preloaded == mapped.preloaded == ["features", "labels"] and arrow.preloaded == []
    reference = in_ram.take(indices)
    assert reference["features"].shape == (100, 64) and reference["features"].dtype == torch.float32
    assert batches_equal(mapped.take(indices), reference)
    assert batches_equal(arrow.take(indices), reference)


def file_backed(tmp_path, columns: dict, rows_per_chunk: int = 100) -> datasets.Dataset:
    """A dataset memory-mapped from an Arrow cache file written in record batches of rows_per_chunk."""
    return datasets.Dataset.from_dict(columns).map(cache_file_name=str(tmp_path / "rows.arrow"), writer_batch_size=rows_per_chunk)


def test_memory_mapped_copy_is_written_once_next_to_the_dataset(tmp_path):
    dataset = file_backed(tmp_path, {"x": [[i, -i] for i in range(1000)], "label": [i % 7 for i in range(1000)]})
    assert dataset.data.table.column("x").num_chunks == 10
    first = data.ColumnarBatches(dataset, ["x"], "label", torch.long, preload_max_bytes=0)
    files = sorted(tmp_path.glob("columns-*.npy"))
    assert len(files) == 2 and not list(tmp_path.glob("*.partial.npy"))  # features (as float32) and labels
    assert first.preloaded == ["features", "labels"]
    assert first.take([999, 3])["features"].tolist() == [[999.0, -999.0], [3.0, -3.0]]
    mtimes = [os.stat(f).st_mtime_ns for f in files]

    again = data.ColumnarBatches(dataset, ["x"], "label", torch.long, preload_max_bytes=0)
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes, "a second loader reuses the files"
    assert batches_equal(first.take([3, 1, 4]), again.take([3, 1, 4]))


def test_single_chunk_column_of_the_batch_dtype_is_used_in_place():
    values = np.arange(40, dtype=np.float32)
    dataset = table_dataset({"x": pa.FixedSizeListArray.from_arrays(pa.array(values), 4), "label": pa.array(range(10))})
    rows = data.ColumnarBatches(dataset, ["x"], "label", torch.long, preload_max_bytes=0)

    assert rows.preloaded == ["features", "labels"]  # nothing copied, nothing over budget
    buffer = dataset.data.table.column("x").chunk(0).flatten().buffers()[1]
    assert rows._dense["features"].data_ptr() == buffer.address
    assert rows.take([2, 0])["features"].tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]


def test_budget_is_shared_by_the_columns_and_the_rest_uses_arrow_take():
    dataset = table_dataset({"x": pa.array(np.arange(1000, dtype=np.float64)), "y": pa.array(np.arange(1000, dtype=np.int32)),
                             "label": pa.array(np.arange(1000) % 3)}, chunks=4)
    # features as float32: 4000 bytes; y as int64: 8000 bytes; labels as int64: 8000 bytes.
    rows = data.ColumnarBatches(dataset, ["x"], "label", torch.long, input_columns=["y"], preload_max_bytes=12_000)
    assert rows.preloaded == ["features", "y"]
    batch = rows.take([999, 5])
    assert batch["features"].tolist() == [999.0, 5.0] and batch["y"].tolist() == [999, 5] and batch["labels"].tolist() == [0, 2]
    assert batch["y"].dtype == batch["labels"].dtype == torch.int64


@pytest.mark.parametrize("chunks, budget", [(1, 1 << 20), (3, 1 << 20), (3, 0)], ids=["in place", "copied", "arrow take"])
def test_stacked_columns_are_the_same_on_every_path(chunks, budget):
    dataset = table_dataset({"a": pa.array(np.arange(9.0)), "v": pa.array([[i, -i] for i in range(9)]),
                             "b": pa.array(np.arange(9) * 10), "w": pa.array([[i, i] for i in range(9)]),
                             "label": pa.array(range(9))}, chunks)
    scalars = data.ColumnarBatches(dataset, ["b", "a"], "label", torch.long, preload_max_bytes=budget)
    lists = data.ColumnarBatches(dataset, ["v", "w"], "label", torch.long, preload_max_bytes=budget)
    assert scalars.take([7, 2])["features"].tolist() == [[70.0, 7.0], [20.0, 2.0]]
    assert lists.take([7, 2])["features"].tolist() == [[[7.0, -7.0], [7.0, 7.0]], [[2.0, -2.0], [2.0, 2.0]]]


# ---------------------------------------------------------------- named inputs and dtypes


def named_inputs_dataset(chunks=1):
    n = 12
    return table_dataset({
        "input_ids": pa.array([[i, i + 1, i + 2] for i in range(n)], pa.list_(pa.int32())),  # lists of one length
        "attention_mask": pa.array([[1, 1, int(i % 2 == 0)] for i in range(n)], pa.list_(pa.int8())),
        "weight": pa.array([i / 2 for i in range(n)], pa.float64()),
        "flag": pa.array([i % 3 == 0 for i in range(n)]),
        "label": pa.array([i % 2 for i in range(n)]),
    }, chunks)


def test_input_columns_keep_their_names_as_int64_float32_or_bool():
    rows = data.ColumnarBatches(named_inputs_dataset(), [], "label", torch.long,
                                input_columns=["input_ids", "attention_mask", "weight", "flag"])
    batch = rows.take([4, 9])
    assert list(batch) == ["input_ids", "attention_mask", "weight", "flag", "labels"]  # no features key
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].tolist() == [[4, 5, 6], [9, 10, 11]]
    assert batch["attention_mask"].dtype == torch.int64 and batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == [2.0, 4.5]
    assert batch["flag"].dtype == torch.bool and batch["flag"].tolist() == [False, True]


@pytest.mark.parametrize("chunks, budget", [(1, 1 << 20), (3, 1 << 20), (3, 0)], ids=["in place", "copied", "arrow take"])
def test_dtypes_override_every_batch_key(chunks, budget):
    rows = data.ColumnarBatches(named_inputs_dataset(chunks), ["weight"], "label", torch.long, input_columns=["input_ids"],
                                dtypes={"features": torch.float64, "input_ids": torch.int32, "labels": torch.float32},
                                preload_max_bytes=budget)
    batch = rows.take([11, 0])
    assert batch["features"].dtype == torch.float64 and batch["features"].tolist() == [5.5, 0.0]
    assert batch["input_ids"].dtype == torch.int32 and batch["input_ids"].tolist() == [[11, 12, 13], [0, 1, 2]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0, 0.0]


def test_loader_applies_config_dtypes_and_rejects_unknown_keys():
    opts = DatasetOptions(feature_columns=["weight"], input_columns=["input_ids"], dtypes={"input_ids": "int32", "features": "float16"})
    loader = data.build_loader(named_inputs_dataset(), opts, label_dtype=torch.long, batch_size=4, seed=0, train=False)
    batch = next(iter(loader))
    assert batch["input_ids"].dtype == torch.int32 and batch["features"].dtype == torch.float16

    bad = opts.model_copy(update={"dtypes": {"attention_mask": "int64"}})
    with pytest.raises(ConfigError, match=r"dataset_options\.dtypes: 'attention_mask'.*\['features', 'input_ids', 'labels'\]"):
        data.build_loader(named_inputs_dataset(), bad, label_dtype=torch.long, batch_size=4, seed=0, train=False)


def test_nested_fixed_size_lists_keep_their_shape():
    images = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(np.arange(72, dtype=np.float32)), 3), 2)
    rows = data.ColumnarBatches(table_dataset({"image": images, "label": pa.array(range(12))}), ["image"], "label", torch.long)
    assert rows.take([1])["features"].tolist() == [[[6, 7, 8], [9, 10, 11]]]
    assert data.describe(table_dataset({"image": images, "label": pa.array(range(12))}),
                         DatasetOptions(feature_columns=["image"]), "classification") == {"input_dim": 6, "num_classes": 12}


@pytest.mark.parametrize("vectorization", [True, False])
def test_per_row_path_serves_the_same_named_input_batches(vectorization):
    opts = DatasetOptions(feature_columns=["weight"], input_columns=["input_ids", "attention_mask"], vectorization=True)
    vectorized = all_batches(data.build_loader(named_inputs_dataset(), opts, label_dtype=torch.long, batch_size=5, seed=3, train=True))
    per_row_opts = opts.model_copy(update={"vectorization": vectorization})
    other = all_batches(data.build_loader(named_inputs_dataset(3), per_row_opts, label_dtype=torch.long, batch_size=5, seed=3, train=True))
    assert len(vectorized) == len(other) == 3
    assert all(batches_equal(a, b) for a, b in zip(vectorized, other))


# ---------------------------------------------------------------- columns that cannot be batched


@pytest.mark.parametrize("column, message", [
    (pa.array([[1, 2], [3], [4, 5]]), r"'x' holds lists of different lengths \(1 to 2\).*pad them"),
    (pa.array(["a", "b", "c"]), r"'x' holds string, not numbers"),
    (pa.array([1.0, None, 2.0]), r"'x' has 1 missing values"),
    (pa.array([[1.0, None], [2.0, 3.0], [4.0, 5.0]]), r"'x' has missing values inside its lists"),
])
def test_column_that_cannot_be_batched_is_named(column, message):
    with pytest.raises(data.DataError, match=message):
        data.ColumnarBatches(table_dataset({"x": column, "label": pa.array([0, 1, 0])}), ["x"], "label", torch.long)


def test_non_finite_values_are_found_chunk_by_chunk_with_their_row(tmp_path):
    rows = [[float(i), 1.0] for i in range(1000)]
    rows[523][1], rows[871][0] = float("nan"), float("inf")
    dataset = file_backed(tmp_path, {"x": rows, "label": [0] * 1000})
    assert dataset.data.table.column("x").num_chunks == 10
    with pytest.raises(data.DataError, match=r"feature_columns: column 'x' .* has 2 NaN, infinite or missing value\(s\), "
                                             r"the first in row 523"):
        data.load_splits(DatasetOptions(feature_columns=["x"], validation_split=0.0), seed=0, train_dataset=dataset)


def test_stacked_feature_columns_must_share_a_shape():
    dataset = table_dataset({"x": pa.array([1.0, 2.0]), "v": pa.array([[1.0, 2.0], [3.0, 4.0]]), "label": pa.array([0, 1])})
    with pytest.raises(data.DataError, match=r"feature_columns: the columns have different row shapes"):
        data.ColumnarBatches(dataset, ["x", "v"], "label", torch.long)


def test_missing_input_column_names_the_config_key(tmp_path):
    with pytest.raises(data.DataError, match=r"dataset_options\.input_columns: column 'token_type_ids' is not in the train data"):
        data.load_splits(DatasetOptions(input_columns=["input_ids", "token_type_ids"]), seed=0,
                         train_dataset=named_inputs_dataset())


# ---------------------------------------------------------------- class labels


def label_dataset(labels, feature=None):
    dataset = datasets.Dataset.from_dict({"x": [float(i) for i in range(len(labels))], "label": labels})
    return dataset.cast_column("label", feature) if feature is not None else dataset


@pytest.mark.parametrize("labels, message", [
    ([0, 1, -2], r"column 'label' of the train data holds the class -2"),
    ([0.0, 1.5, 2.0], r"column 'label' of the train data holds non-integer values"),
])
def test_class_label_that_is_no_index_is_named(labels, message):
    with pytest.raises(data.DataError, match=message):
        data.describe(label_dataset(labels), DatasetOptions(feature_columns=["x"]), "classification")


def test_validation_label_outside_the_training_classes_is_named():
    with pytest.raises(data.DataError, match=r"'label' of the validation data holds the class 5, outside the class range "
                                             r"\(the training labels hold classes 0 to 2\)"):
        data.describe(label_dataset([0, 1, 2]), DatasetOptions(feature_columns=["x"]), "classification",
                      validation=label_dataset([2, 5]))


def test_class_label_feature_sets_the_number_of_classes():
    five = datasets.ClassLabel(num_classes=5)
    info = data.describe(label_dataset([0, 1, 1], five), DatasetOptions(feature_columns=["x"]), "classification")
    assert info == {"input_dim": 1, "num_classes": 5}
    # Integral floats are class indices; -100 marks ignored positions and is no class.
    info = data.describe(label_dataset([0.0, 3.0, -100.0]), DatasetOptions(feature_columns=["x"]), "classification")
    assert info["num_classes"] == 4


def test_describe_without_feature_columns_gives_only_the_classes():
    assert data.describe(named_inputs_dataset(), DatasetOptions(input_columns=["input_ids"]), "classification") == {"num_classes": 2}


# ---------------------------------------------------------------- resume and sharding


@pytest.mark.parametrize("vectorization", [True, False])
def test_resume_mid_epoch_serves_the_same_next_batch(digits, vectorization):
    def loader():
        train_loader = data.build_loader(digits.train, digits_options(vectorization=vectorization), label_dtype=torch.long,
                                         batch_size=32, seed=9, train=True)
        train_loader.sampler.set_epoch(3)
        return train_loader

    uninterrupted = all_batches(loader())
    resumed = loader()
    resumed.sampler.start = 7 * 32  # 7 batches of epoch 3 consumed before the crash
    rest = all_batches(resumed)
    assert len(rest) == len(uninterrupted) - 7
    assert all(batches_equal(a, b) for a, b in zip(rest, uninterrupted[7:]))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("start", [0, 7 * 32, 1000])
@pytest.mark.parametrize("batches_per_gather", [None, 1, 3])
def test_in_process_loader_serves_the_dataloaders_batches(digits, drop_last, start, batches_per_gather, monkeypatch):
    """The single-process fast path: the same batches as the DataLoader, from any resume position,
    whether it gathers the whole epoch at once (None: the default size), one batch or three at a time."""
    if batches_per_gather is not None:  # a digits row: 64 float32 pixels and an int64 label
        monkeypatch.setattr(data.in_process, "GATHER_BYTES", batches_per_gather * 32 * (64 * 4 + 8))

    def loader(device):
        built = data.build_loader(digits.train, digits_options(drop_last=drop_last), label_dtype=torch.long,
                                  batch_size=32, seed=9, train=True, in_process_device=device)
        built.sampler.set_epoch(3)
        built.sampler.start = start
        return built

    reference, fast = loader(None), loader(torch.device("cpu"))
    assert isinstance(fast, data.InProcessLoader) and isinstance(reference, torch.utils.data.DataLoader)
    assert fast._batches_per_gather() == (batches_per_gather or (4 << 20) // (32 * (64 * 4 + 8)))
    expected = all_batches(reference)
    served = all_batches(fast)
    assert len(fast) == len(reference) == len(expected) == len(served) > 0
    assert all(batches_equal(a, b) for a, b in zip(served, expected))
    assert all(len(batch["labels"]) == 32 for batch in served) or not drop_last


@pytest.mark.parametrize("options", [{"vectorization": False}, {"num_workers": 1}])
def test_in_process_loader_only_for_the_vectorized_path_without_workers(digits, options):
    built = data.build_loader(digits.train, digits_options(**options), label_dtype=torch.long, batch_size=32, seed=9,
                              train=True, in_process_device=torch.device("cpu"))
    assert isinstance(built, torch.utils.data.DataLoader)


@pytest.mark.parametrize("rows, drop_last, served_rows", [(400, False, 400), (437, False, 440), (437, True, 420)])
def test_two_processes_share_every_row_of_an_epoch(rows, drop_last, served_rows):
    dataset = datasets.Dataset.from_dict({"id": list(range(rows)), "label": [0] * rows})
    opts = DatasetOptions(feature_columns=["id"], drop_last=drop_last)
    loader = data.build_loader(dataset, opts, label_dtype=torch.long, batch_size=10, seed=1, train=True, num_processes=2)
    loader.sampler.set_epoch(2)
    served = []
    for rank in (0, 1):
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        batches = [batch["features"].long().tolist() for batch in shard]
        assert all(len(batch) == 10 for batch in batches), "every process gets full batches"
        served += [i for batch in batches for i in batch]

    # Whole rounds of 2 x 10 rows: the epoch is padded with its own first rows, or cut with drop_last.
    order = loader.sampler.permutation().tolist()
    assert len(served) == served_rows and sorted(served) == sorted(order)
    if served_rows >= rows:
        assert set(served) == set(range(rows)), "every row at least once"
        assert order[rows:] == order[:served_rows - rows], "the only repeats are the epoch's first rows"
    if served_rows == rows:
        assert sorted(served) == list(range(rows)), "every row exactly once"
