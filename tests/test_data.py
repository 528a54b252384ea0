"""data.py: loading local files into splits, and the batches the DataLoader yields from them."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from accelerated_trainer import data
from accelerated_trainer.config import ConfigError, DatasetOptions

from conftest import DIGITS

ROWS = [  # (a, b, c, label): the small table every file-format test writes
    (0.5, 10.0, -1.0, 0),
    (1.5, 11.0, -2.0, 1),
    (2.5, 12.0, -3.0, 2),
    (3.5, 13.0, -4.0, 0),
    (4.5, 14.0, -5.0, 1),
]


@pytest.fixture(scope="module", autouse=True)
def isolated_datasets_cache(tmp_path_factory):
    # load_dataset caches what it reads; keep that cache out of the home directory.
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield


def write_csv(path, rows=ROWS):
    path.write_text("a,b,c,label\n" + "".join(f"{a},{b},{c},{label}\n" for a, b, c, label in rows))
    return path


def write_jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps({"a": a, "b": b, "c": c, "label": label}) + "\n" for a, b, c, label in rows))
    return path


def write_parquet(path, rows=ROWS):
    columns = list(zip(*rows)) if rows else [[], [], [], []]
    table = pa.table({
        "a": pa.array(columns[0], pa.float64()),
        "b": pa.array(columns[1], pa.float64()),
        "c": pa.array(columns[2], pa.float64()),
        "label": pa.array(columns[3], pa.int64()),
    })
    pq.write_table(table, path)
    return path


WRITERS = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}


def options(data_files, **kwargs) -> DatasetOptions:
    kwargs.setdefault("feature_columns", ["a", "b", "c"])
    return DatasetOptions(data_files=data_files, **kwargs)


def digits_options(**kwargs) -> DatasetOptions:
    files = {"train": str(DIGITS / "train.parquet"), "validation": str(DIGITS / "validation.parquet")}
    return DatasetOptions(data_files=files, feature_columns=["pixels"], label_column="label", **kwargs)


@pytest.fixture(scope="module")
def digits():
    return data.load_splits(digits_options(), seed=0)


def column(dataset, name) -> list:
    return list(dataset[name])


def all_batches(loader):
    return [{key: value.clone() for key, value in batch.items()} for batch in loader]


# ---------------------------------------------------------------- loading files


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_format_loads_rows_in_file_order(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"train.{fmt}")
    splits = data.load_splits(options({"train": str(path)}, validation_split=0.0), seed=0)

    assert splits.validation is None
    rows = data.ColumnarBatches(splits.train, ["a", "b", "c"], "label", torch.long)
    batch = rows.__getitems__(list(range(len(ROWS))))
    expected = torch.tensor([row[:3] for row in ROWS], dtype=torch.float32)
    assert torch.equal(batch["features"], expected)
    assert torch.equal(batch["labels"], torch.tensor([row[3] for row in ROWS]))
    assert str(path) in splits.source and "dataset_options.data_files.train" in splits.source


def test_validation_file_is_loaded_as_the_validation_split(tmp_path):
    train = write_csv(tmp_path / "train.csv")
    validation = write_csv(tmp_path / "validation.csv", ROWS[:2])
    splits = data.load_splits(options({"train": str(train), "validation": str(validation)}), seed=0)

    # A validation file wins over validation_split (0.1 by default): train keeps every row.
    assert len(splits.train) == len(ROWS)
    assert len(splits.validation) == 2


def test_glob_pattern_concatenates_matching_files_in_sorted_order(tmp_path):
    write_csv(tmp_path / "part-1.csv", ROWS[2:])
    write_csv(tmp_path / "part-0.csv", ROWS[:2])
    write_csv(tmp_path / "other.csv", [(99.0, 99.0, 99.0, 9)])  # must not match
    splits = data.load_splits(options({"train": str(tmp_path / "part-*.csv")}, validation_split=0.0), seed=0)

    assert column(splits.train, "a") == [row[0] for row in ROWS]


def test_list_of_patterns_loads_every_entry(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "rest-0.jsonl", ROWS[1:3])
    write_jsonl(tmp_path / "rest-1.jsonl", ROWS[3:])
    files = {"train": [str(first), str(tmp_path / "rest-*.jsonl")]}
    splits = data.load_splits(options(files, validation_split=0.0), seed=0)

    assert column(splits.train, "a") == [row[0] for row in ROWS]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_missing_file_names_the_config_key_and_the_path(tmp_path, split):
    files = {"train": str(write_csv(tmp_path / "train.csv")), "validation": str(write_csv(tmp_path / "val.csv"))}
    files[split] = str(tmp_path / "nope.csv")
    with pytest.raises(data.DataError) as err:
        data.load_splits(options(files), seed=0)
    assert f"dataset_options.data_files.{split}" in str(err.value)
    assert "nope.csv" in str(err.value)


def test_glob_that_matches_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "shard-*.parquet")
    with pytest.raises(data.DataError, match=r"dataset_options\.data_files\.train") as err:
        data.load_splits(options({"train": pattern}), seed=0)
    assert pattern in str(err.value)


def test_mixed_file_formats_are_rejected(tmp_path):
    files = {"train": [str(write_csv(tmp_path / "a.csv")), str(write_jsonl(tmp_path / "b.jsonl"))]}
    with pytest.raises(data.DataError, match=r"dataset_options\.data_files\.train"):
        data.load_splits(options(files), seed=0)


def test_missing_train_files_is_a_config_error():
    with pytest.raises(ConfigError, match=r"dataset_options\.data_files\.train"):
        data.load_splits(options({}), seed=0)


def test_missing_label_column_names_the_config_key_and_the_column(tmp_path):
    path = write_csv(tmp_path / "train.csv")
    with pytest.raises(data.DataError) as err:
        data.load_splits(options({"train": str(path)}, label_column="target"), seed=0)
    message = str(err.value)
    assert "dataset_options.label_column" in message and "'target'" in message
    assert "train" in message


def test_missing_feature_column_names_the_config_key_and_the_column(tmp_path):
    path = write_parquet(tmp_path / "train.parquet")
    with pytest.raises(data.DataError) as err:
        data.load_splits(options({"train": str(path)}, feature_columns=["a", "pixels"]), seed=0)
    message = str(err.value)
    assert "dataset_options.feature_columns" in message and "'pixels'" in message


def test_missing_column_in_validation_file_names_the_validation_split(tmp_path):
    train = write_csv(tmp_path / "train.csv")
    validation = tmp_path / "validation.csv"
    validation.write_text("a,b,label\n1.0,2.0,0\n")  # no column c
    with pytest.raises(data.DataError) as err:
        data.load_splits(options({"train": str(train), "validation": str(validation)}), seed=0)
    assert "dataset_options.feature_columns" in str(err.value) and "'c'" in str(err.value)
    assert "validation" in str(err.value)


def test_empty_in_memory_split_is_an_error():
    with pytest.raises(data.DataError, match="empty"):
        data.load_splits(options({}), seed=0, train_dataset={"a": [], "b": [], "c": [], "label": []})


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_empty_file_is_a_data_error_naming_the_config_key(tmp_path, fmt):
    # _load_file_split promises DataError("...: the train split is empty") for an empty file.
    path = tmp_path / f"train.{fmt}"
    if fmt == "csv":
        path.write_text("a,b,c,label\n")
    elif fmt == "jsonl":
        path.write_text("")
    else:
        write_parquet(path, rows=[])
    with pytest.raises(data.DataError, match=r"dataset_options\.data_files\.train"):
        data.load_splits(options({"train": str(path)}), seed=0)


# ---------------------------------------------------------------- held-out validation


def ids_table(tmp_path, n=200):
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "label": pa.array([i % 3 for i in range(n)])}), path)
    return options({"train": str(path)}, feature_columns=["id"], validation_split=0.25)


def test_validation_split_is_seeded_disjoint_and_complete(tmp_path):
    opts = ids_table(tmp_path)
    first = data.load_splits(opts, seed=7)
    again = data.load_splits(opts, seed=7)
    other = data.load_splits(opts, seed=8)

    assert len(first.validation) == 50 and len(first.train) == 150
    assert column(first.validation, "id") == column(again.validation, "id")
    assert column(first.train, "id") == column(again.train, "id")
    assert sorted(column(first.validation, "id")) != sorted(column(other.validation, "id"))
    assert not set(column(first.train, "id")) & set(column(first.validation, "id"))
    assert sorted(column(first.train, "id") + column(first.validation, "id")) == list(range(200))


def test_held_out_rows_are_materialized_for_arrow_take(tmp_path):
    # A split dataset keeps an indices mapping; the batches must serve the split's rows, not the file's.
    splits = data.load_splits(ids_table(tmp_path), seed=7)
    rows = data.ColumnarBatches(splits.validation, ["id"], "label", torch.long)
    batch = rows.__getitems__(list(range(len(rows))))
    assert batch["features"].tolist() == [float(i) for i in column(splits.validation, "id")]


def test_validation_split_zero_means_no_validation(tmp_path):
    opts = ids_table(tmp_path).model_copy(update={"validation_split": 0.0})
    splits = data.load_splits(opts, seed=7)
    assert splits.validation is None and len(splits.train) == 200


# ---------------------------------------------------------------- batches


def test_scalar_feature_columns_stack_in_column_order(tmp_path):
    splits = data.load_splits(options({"train": str(write_csv(tmp_path / "t.csv"))}, validation_split=0.0), seed=0)
    rows = data.ColumnarBatches(splits.train, ["c", "a"], "label", torch.long)
    batch = rows.__getitems__([4, 1])

    assert batch["features"].shape == (2, 2)
    assert batch["features"].dtype == torch.float32
    assert batch["features"].tolist() == [[-5.0, 4.5], [-2.0, 1.5]]
    assert batch["labels"].tolist() == [1, 1] and batch["labels"].dtype == torch.long


def test_list_column_becomes_a_2d_float_tensor(digits):
    rows = data.ColumnarBatches(digits.train, ["pixels"], "label", torch.long)
    batch = rows.__getitems__([0, 5, 3])

    assert batch["features"].shape == (3, 64) and batch["features"].dtype == torch.float32
    assert batch["labels"].shape == (3,) and batch["labels"].dtype == torch.long
    assert batch["features"][1].tolist() == pytest.approx(column(digits.train, "pixels")[5])
    assert batch["labels"][2].item() == column(digits.train, "label")[3]


def test_label_dtype_is_applied(digits):
    rows = data.ColumnarBatches(digits.validation, ["pixels"], "label", torch.float32)
    assert rows.__getitems__([0, 1])["labels"].dtype == torch.float32


@pytest.mark.parametrize("order_seed", [0, 1, 2])
def test_vectorized_batch_equals_stacked_rows(digits, order_seed):
    rows = data.ColumnarBatches(digits.train, ["pixels"], "label", torch.long)
    generator = torch.Generator().manual_seed(order_seed)
    indices = torch.randperm(len(rows), generator=generator)[:37].tolist()

    batch = rows.__getitems__(indices)
    singles = [rows[i] for i in indices]
    for key in ("features", "labels"):
        stacked = torch.stack([single[key] for single in singles])
        assert batch[key].dtype == stacked.dtype
        assert torch.equal(batch[key], stacked)


def test_vectorized_batch_equals_stacked_rows_for_scalar_columns(tmp_path):
    splits = data.load_splits(options({"train": str(write_parquet(tmp_path / "t.parquet"))}, validation_split=0.0), seed=0)
    rows = data.ColumnarBatches(splits.train, ["b", "a", "c"], "label", torch.long)
    indices = [3, 0, 4, 2]
    batch = rows.__getitems__(indices)
    assert torch.equal(batch["features"], torch.stack([rows[i]["features"] for i in indices]))
    assert torch.equal(batch["labels"], torch.stack([rows[i]["labels"] for i in indices]))


def test_describe_digits(digits):
    info = data.describe(digits.train, digits_options(), "classification")
    assert info == {"input_dim": 64, "num_classes": 10}


def test_describe_regression_has_no_num_classes(tmp_path):
    splits = data.load_splits(options({"train": str(write_csv(tmp_path / "t.csv"))}, validation_split=0.0), seed=0)
    assert data.describe(splits.train, options({}), "regression") == {"input_dim": 3}


# ---------------------------------------------------------------- order and loaders


def epoch_order(seed, epoch, n=50):
    sampler = data.EpochSampler(n, seed, shuffle=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(3, 0) == epoch_order(3, 0)
    assert epoch_order(3, 5) == epoch_order(3, 5)
    assert epoch_order(3, 0) != epoch_order(3, 1)
    assert epoch_order(3, 0) != epoch_order(4, 0)


def test_epoch_sampler_replays_an_epoch_after_others():
    sampler = data.EpochSampler(50, 3, shuffle=True)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == epoch_order(3, 2)


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_epoch_sampler_is_a_permutation(epoch):
    order = epoch_order(11, epoch)
    assert sorted(order) == list(range(50))
    assert len(data.EpochSampler(50, 11, shuffle=True)) == 50


def test_epoch_sampler_without_shuffle_is_in_order():
    sampler = data.EpochSampler(6, 3, shuffle=False)
    sampler.set_epoch(4)
    assert list(sampler) == [0, 1, 2, 3, 4, 5]


def loader(dataset, vectorization, *, seed=5, train=True, batch_size=32, **kwargs):
    opts = digits_options(vectorization=vectorization, **kwargs)
    return data.build_loader(dataset, opts, label_dtype=torch.long, batch_size=batch_size, seed=seed, train=train)


def test_vectorized_loader_yields_seeded_shuffled_batches(digits):
    first = all_batches(loader(digits.train, True))
    again = all_batches(loader(digits.train, True))
    other = all_batches(loader(digits.train, True, seed=6))

    n = len(digits.train)
    assert [b["features"].shape[0] for b in first] == [32] * (n // 32) + [n % 32] * (n % 32 > 0)
    assert all(torch.equal(x["features"], y["features"]) for x, y in zip(first, again))
    assert not torch.equal(first[0]["features"], other[0]["features"])
    rows = data.ColumnarBatches(digits.train, ["pixels"], "label", torch.long)
    expected = rows.__getitems__(epoch_order(5, 0, n=n)[:32])
    assert torch.equal(first[0]["features"], expected["features"])
    assert torch.equal(first[0]["labels"], expected["labels"])


def test_loader_epoch_changes_with_sampler_epoch(digits):
    train_loader = loader(digits.train, True)
    epoch0 = next(iter(train_loader))["labels"].clone()
    train_loader.sampler.set_epoch(1)
    epoch1 = next(iter(train_loader))["labels"].clone()
    train_loader.sampler.set_epoch(0)
    assert torch.equal(next(iter(train_loader))["labels"], epoch0)
    assert not torch.equal(epoch0, epoch1)


def test_eval_loader_keeps_order_and_last_batch(digits):
    batches = all_batches(loader(digits.validation, True, train=False, drop_last=True, batch_size=100))
    assert [b["labels"].shape[0] for b in batches] == [100, 100, 100, 59]
    assert torch.cat([b["labels"] for b in batches]).tolist() == column(digits.validation, "label")


def test_train_loader_drops_last_batch_when_asked(digits):
    batches = all_batches(loader(digits.train, True, drop_last=True, batch_size=100))
    assert [b["labels"].shape[0] for b in batches] == [100] * 14


def test_per_row_loader_yields_the_same_batches_as_vectorized(digits, monkeypatch):
    vectorized = all_batches(loader(digits.train, True, batch_size=50))
    fetched = []
    fetch_row = data.RowByRow.__getitem__
    monkeypatch.setattr(data.RowByRow, "__getitem__", lambda rows, i: fetched.append(i) or fetch_row(rows, i))
    per_row = all_batches(loader(digits.train, False, batch_size=50))

    assert sorted(fetched) == list(range(len(digits.train)))  # one fetch per row, each row once
    assert len(per_row) == len(vectorized)
    for rows, columns in zip(per_row, vectorized):
        assert rows.keys() == columns.keys()
        for key in rows:
            assert rows[key].dtype == columns[key].dtype
            assert torch.equal(rows[key], columns[key])


def test_per_row_loader_passes_rows_to_custom_collate_fn(digits):
    seen = []

    def collate(rows):
        seen.append(len(rows))
        return {"features": torch.stack([r["features"] for r in rows]) * 2, "labels": torch.stack([r["labels"] for r in rows])}

    opts = digits_options(vectorization=False)
    custom = data.build_loader(digits.validation, opts, label_dtype=torch.long, batch_size=16, seed=0, train=False, collate_fn=collate)
    batch = next(iter(custom))
    plain = next(iter(loader(digits.validation, True, train=False, batch_size=16)))
    assert seen == [16]
    assert torch.equal(batch["features"], plain["features"] * 2)


def test_collate_fn_with_vectorization_is_a_config_error(digits):
    with pytest.raises(ConfigError, match="vectorization"):
        data.build_loader(
            digits.train, digits_options(vectorization=True), label_dtype=torch.long, batch_size=8, seed=0, train=True,
            collate_fn=lambda rows: rows,
        )


# ---------------------------------------------------------------- columns the config leaves out


def test_left_out_feature_columns_are_the_columns_other_than_the_label(tmp_path, digits):
    scalars = data.load_splits(DatasetOptions(data_files={"train": str(write_csv(tmp_path / "t.csv"))}, validation_split=0.0), seed=0)
    assert scalars.options.feature_columns == ["a", "b", "c"]  # scalar columns, stacked in file order
    one_array = data.load_splits(DatasetOptions(data_files=digits_options().data_files), seed=0)
    assert one_array.options.feature_columns == ["pixels"]
    rows = data.ColumnarBatches(one_array.train, one_array.options.feature_columns, "label", torch.long)
    assert rows.take([0])["features"].shape == (1, 64)
    named = data.load_splits(DatasetOptions(input_columns=["a"], validation_split=0.0), seed=0,
                             train_dataset={"a": [1, 2], "b": [[1.0, 2.0], [3.0, 4.0]], "label": [0, 1]})
    assert named.options.feature_columns == [], "with input_columns named, the model takes only what the config names"


@pytest.mark.parametrize("columns, listed", [
    ({"pixels": [[1.0, 2.0], [3.0, 4.0]], "weight": [1.0, 2.0]}, ["pixels", "weight"]),  # an array and a scalar
    ({"x": [1.0, 2.0], "name": ["a", "b"]}, ["x", "name"]),  # text is no feature
    ({}, []),  # nothing but the label
])
def test_ambiguous_features_are_one_error_listing_the_columns(columns, listed):
    with pytest.raises(data.DataError) as err:
        data.load_splits(DatasetOptions(validation_split=0.0), seed=0, train_dataset={**columns, "label": [0, 1]})
    message = str(err.value)
    assert "dataset_options.feature_columns" in message and "input_columns" in message
    assert all(repr(name) in message for name in listed) and "\n" not in message


def test_a_validation_file_is_used_together_with_train_dataset(tmp_path):
    validation = write_csv(tmp_path / "validation.csv", ROWS[:2])
    train = {"a": [9.0] * 20, "b": [9.0] * 20, "c": [9.0] * 20, "label": [1] * 20}
    splits = data.load_splits(options({"validation": str(validation)}), seed=0, train_dataset=train)
    assert len(splits.train) == 20, "no hold-out taken from train"
    assert column(splits.validation, "a") == [0.5, 1.5]
    assert "validation.csv" in splits.sources["validation"]


def test_text_labels_of_a_classification_task_become_class_indices(tmp_path):
    (tmp_path / "train.csv").write_text("x,label\n1.0,pos\n2.0,neg\n3.0,pos\n")
    (tmp_path / "validation.csv").write_text("x,label\n1.5,neg\n")
    opts = DatasetOptions(data_files={"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "validation.csv")},
                          task="classification")
    splits = data.load_splits(opts, seed=0)
    assert splits.train.features["label"].names == ["neg", "pos"]
    assert column(splits.train, "label") == [1, 0, 1] and column(splits.validation, "label") == [0]
    (tmp_path / "validation.csv").write_text("x,label\n1.5,meh\n")
    with pytest.raises(data.DataError, match=r"dataset_options\.label_column: .*validation.*'meh'.*\['neg', 'pos'\]"):
        data.load_splits(opts, seed=0)
