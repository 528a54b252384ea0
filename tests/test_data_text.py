"""data preprocessing: transforms through datasets.map and its cache, and the language-modelling
text path (byte, char and local HF tokenizers, packing into blocks)."""

import json
import os
from pathlib import Path

import datasets
import pytest
import torch

from accelerated_trainer import data
from accelerated_trainer.config import ConfigError, DatasetOptions

from test_data import all_batches, isolated_datasets_cache, write_csv  # noqa: F401  (autouse fixture)
from test_data_batches import batches_equal


def text_options(train: Path, **text) -> DatasetOptions:
    return DatasetOptions(data_files={"train": str(train)}, text=text, validation_split=0.0)


def blocks(split, key="input_ids") -> list[list[int]]:
    return split[key]


def cache_files(root) -> set[str]:
    return {str(path) for path in Path(root).rglob("*.arrow")}


# ---------------------------------------------------------------- transforms


def add_total(batch, *, log=None):
    """A transform for the tests: a new column, and one line per call in `log` (pid, rows)."""
    if log:
        with open(log, "a") as out:
            out.write(f"{os.getpid()} {len(batch['a'])}\n")
    return {"total": [a + b for a, b in zip(batch["a"], batch["b"])]}


def duplicate_rows(batch):
    """A transform that changes the number of rows (needs remove_columns)."""
    return {"x": [a for a in batch["a"] for _ in range(2)], "label": [label for label in batch["label"] for _ in range(2)]}


def transform_options(path, log, num_proc=1) -> DatasetOptions:
    return DatasetOptions(data_files={"train": str(path)}, feature_columns=["total"], validation_split=0.0, num_proc=num_proc,
                          transforms=[{"name": "test_data_text:add_total", "kwargs": {"log": str(log)}, "batch_size": 10}])


def test_transform_runs_in_num_proc_processes_and_a_second_run_reads_the_cache(tmp_path):
    rows = [(float(i), 10.0 * i, 0.0, i % 2) for i in range(40)]
    path = write_csv(tmp_path / "train.csv", rows)
    log = tmp_path / "calls.log"

    first = data.load_splits(transform_options(path, log, num_proc=2), seed=0)
    calls = [line.split() for line in log.read_text().splitlines()]
    assert first.train["total"] == [11.0 * i for i in range(40)]
    assert sum(int(n) for _, n in calls) == 40 and len(calls) == 4  # batches of 10
    assert len({pid for pid, _ in calls}) == 2 and str(os.getpid()) not in {pid for pid, _ in calls}

    again = data.load_splits(transform_options(path, log, num_proc=2), seed=0)
    assert len(log.read_text().splitlines()) == 4, "the second run read the datasets cache instead of calling the transform"
    assert again.train["total"] == first.train["total"]
    assert again.train.cache_files == first.train.cache_files


def test_transform_that_changes_the_row_count_removes_the_old_columns(tmp_path):
    path = write_csv(tmp_path / "train.csv")
    opts = DatasetOptions(data_files={"train": str(path)}, feature_columns=["x"], validation_split=0.0,
                          transforms=[{"name": "test_data_text:duplicate_rows", "remove_columns": True}])
    splits = data.load_splits(opts, seed=0)
    assert sorted(splits.train.column_names) == ["label", "x"]
    assert splits.train["x"] == [0.5, 0.5, 1.5, 1.5, 2.5, 2.5, 3.5, 3.5, 4.5, 4.5]


@pytest.mark.parametrize("name, message", [
    ("test_data_text.add_total", "'test_data_text.add_total' is not an import path"),
    ("test_data_text:nope", "cannot import 'test_data_text:nope'"),
    ("no_such_module:f", "cannot import 'no_such_module:f'"),
])
def test_transform_that_cannot_be_imported_is_a_config_error(tmp_path, name, message):
    opts = DatasetOptions(data_files={"train": str(write_csv(tmp_path / "t.csv"))}, feature_columns=["a"], transforms=[name])
    with pytest.raises(ConfigError, match=rf"dataset_options\.transforms: {message}"):
        data.load_splits(opts, seed=0)


# ---------------------------------------------------------------- tokenizing and packing


def test_byte_tokens_are_packed_into_overlapping_blocks_of_next_token_labels(tmp_path):
    text = "To be, or not to be: that is the question. "
    (tmp_path / "train.txt").write_text(text)
    splits = data.load_splits(text_options(tmp_path / "train.txt", block_size=8), seed=0)

    stream = list(text.encode())
    n = (len(stream) - 1) // 8
    assert blocks(splits.train) == [stream[i * 8:(i + 1) * 8] for i in range(n)]
    assert blocks(splits.train, "labels") == [stream[i * 8 + 1:(i + 1) * 8 + 1] for i in range(n)]
    assert splits.train.features["labels"].feature.num_classes == 256


def test_char_vocabulary_covers_every_split_and_is_kept_in_the_labels_feature(tmp_path):
    (tmp_path / "train.txt").write_text("abcabcabcabc")
    (tmp_path / "validation.txt").write_text("zzab")  # z only here: still in the vocabulary
    opts = DatasetOptions(data_files={"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "validation.txt")},
                          text={"tokenizer": "char", "block_size": 3})
    splits = data.load_splits(opts, seed=0)

    assert splits.train.features["labels"].feature.names == ["a", "b", "c", "z"]
    assert blocks(splits.train) == [[0, 1, 2]] * 3 and blocks(splits.train, "labels") == [[1, 2, 0]] * 3
    assert blocks(splits.validation) == [[3, 3, 0]] and blocks(splits.validation, "labels") == [[3, 0, 1]]
    info = data.describe(splits.train, opts, "language_modeling", splits.validation)
    assert info == {"input_dim": 3, "num_classes": 4, "vocab_size": 4, "block_size": 3}


def test_line_rows_tokenize_to_the_same_stream_as_the_whole_document(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("".join(f"line {i}: some words\n" for i in range(50)))
    by_document = data.load_splits(text_options(path, tokenizer="char", block_size=16), seed=0)
    by_line = data.load_splits(text_options(path, tokenizer="char", block_size=16, sample_by="line", ), seed=0)
    assert blocks(by_line.train) == blocks(by_document.train)


def test_text_loader_serves_int64_ids_and_labels_whatever_the_task_dtype(tmp_path):
    (tmp_path / "train.txt").write_text("hello world " * 20)
    opts = text_options(tmp_path / "train.txt", block_size=10)
    splits = data.load_splits(opts, seed=0)
    vectorized = all_batches(data.build_loader(splits.train, opts, label_dtype=torch.float32, batch_size=4, seed=1, train=True))
    per_row = all_batches(data.build_loader(splits.train, opts.model_copy(update={"vectorization": False}),
                                            label_dtype=torch.float32, batch_size=4, seed=1, train=True))
    assert vectorized[0]["features"].dtype == vectorized[0]["labels"].dtype == torch.int64
    assert vectorized[0]["features"].shape == (4, 10)
    assert len(vectorized) == len(per_row) == 6 and all(batches_equal(a, b) for a, b in zip(vectorized, per_row))


def test_packed_text_is_cached_for_the_second_run(tmp_path):
    (tmp_path / "train.txt").write_text("some text to tokenize " * 100)
    opts = text_options(tmp_path / "train.txt", tokenizer="char", block_size=32).model_copy(update={"validation_split": 0.2})
    first = data.load_splits(opts, seed=0)
    files = cache_files(datasets.config.HF_DATASETS_CACHE)

    again = data.load_splits(opts, seed=0)
    assert cache_files(datasets.config.HF_DATASETS_CACHE) == files, "nothing tokenized, packed or split again"
    assert again.train.cache_files == first.train.cache_files and blocks(again.train) == blocks(first.train)


def test_local_tokenizer_json_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "train.txt").write_text("the cat sat on the mat " * 3)
    for path in (tmp_path / "tokenizer.json", tmp_path):  # the file, or a directory holding it
        splits = data.load_splits(text_options(tmp_path / "train.txt", tokenizer=str(path), block_size=5), seed=0)
        assert blocks(splits.train) == [[1, 2, 3, 4, 1], [5, 1, 2, 3, 4], [1, 5, 1, 2, 3]]
        assert splits.train.features["labels"].feature.num_classes == 6


def test_local_transformers_tokenizer_directory(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]) + "\n")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    (tmp_path / "train.txt").write_text("The cat sat. " * 4)
    splits = data.load_splits(text_options(tmp_path / "train.txt", tokenizer=str(tokenizer_dir), block_size=4), seed=0)
    assert blocks(splits.train)[0] == [5, 6, 7, 1]  # "." is not in the vocabulary: [UNK], no [CLS]/[SEP] added
    assert splits.train.features["labels"].feature.num_classes == 8


@pytest.mark.parametrize("text, message", [
    ({"tokenizer": "no/such/tokenizer"}, (ConfigError, r"dataset_options\.text\.tokenizer: 'no/such/tokenizer'")),
    ({"column": "body"}, (data.DataError, r"dataset_options\.text\.column: column 'body' is not in the train data")),
    ({"block_size": 64}, (data.DataError, r"fewer than dataset_options\.text\.block_size \+ 1 = 65 tokens")),
])
def test_text_errors_name_the_config_key(tmp_path, text, message):
    (tmp_path / "train.txt").write_text("too short for a block")
    error, pattern = message
    with pytest.raises(error, match=pattern):
        data.load_splits(text_options(tmp_path / "train.txt", **text), seed=0)


def test_text_column_that_is_not_text_is_named(tmp_path):
    with pytest.raises(data.DataError, match=r"column 'text' of the train data holds int64, not text"):
        data.load_splits(DatasetOptions(text={}), seed=0, train_dataset={"text": [1, 2, 3]})
