"""Text for classification (data/text_classification.py, data/padding.py): each row tokenized
alone with the tokenizer's special tokens and truncation, cached, and every batch padded to its
own longest row (rounded up to a multiple of 8) with an attention mask."""

import datasets
import pytest
import torch

from accelerated_trainer import data
from accelerated_trainer.config import ConfigError, DatasetOptions

from conftest import REPO
from test_data import isolated_datasets_cache  # noqa: F401  (autouse fixture)
from test_data_text import cache_files

TOKENIZER = REPO / "data" / "reviews" / "tiny-bert"  # the shipped WordPiece tokenizer of the reviews data
WORDS = "the movie was really good and i loved this phone for the price but the camera is not great".split()


def sentences(n=64, seed=0):
    """Mostly short texts, and every 16th one longer than max_length."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [60 if i % 16 == 0 else length for i, length in enumerate(torch.randint(1, 14, (n,), generator=generator).tolist())]
    starts = torch.randint(0, len(WORDS), (n,), generator=generator).tolist()
    return [" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)) for start, length in zip(starts, lengths)]


def text_options(max_length=40, **text) -> DatasetOptions:
    return DatasetOptions(task="classification", text={"tokenizer": str(TOKENIZER), "max_length": max_length, **text},
                          validation_split=0.0, batch_size=8)


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)


def test_rows_are_tokenized_alone_with_special_tokens_and_truncation():
    texts = sentences()
    splits = data.load_splits(text_options(), seed=0, train_dataset={"text": texts, "label": [i % 2 for i in range(64)]})
    expected = tokenizer()(texts, truncation=True, max_length=40)["input_ids"]
    assert splits.train["input_ids"] == expected, "one row per text: [CLS] ... [SEP], no packing, no padding"
    assert max(map(len, expected)) == 40 and min(map(len, expected)) < 10
    assert sorted(splits.train.column_names) == ["input_ids", "label", "token_type_ids"]
    assert splits.options.input_columns == ["input_ids", "attention_mask", "token_type_ids"]
    assert splits.padding == {"input_ids": 0, "token_type_ids": 0}


def test_batches_are_padded_to_their_longest_row_rounded_up_to_8():
    texts = sentences()
    opts = text_options()
    splits = data.load_splits(opts, seed=0, train_dataset={"text": texts, "label": [i % 2 for i in range(64)]})
    loader = data.build_loader(splits.train, splits.options, label_dtype=torch.long, batch_size=8, seed=3, train=True,
                               padding=splits.padding)
    rows = splits.train["input_ids"]
    widths = []
    for batch, order in zip(loader, torch.split(loader.sampler.permutation(), 8)):
        longest = max(len(rows[i]) for i in order.tolist())
        width = batch["input_ids"].shape[1]
        widths.append(width)
        assert longest <= width <= 40 and width == min(-(-longest // 8) * 8, 40)
        assert batch["attention_mask"].sum(dim=1).tolist() == [len(rows[i]) for i in order.tolist()]
        for row, mask, i in zip(batch["input_ids"], batch["attention_mask"], order.tolist()):
            assert row[mask.bool()].tolist() == rows[i] and (row[~mask.bool()] == 0).all()  # [PAD] is id 0
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert len(set(widths)) > 1, "each batch has its own width"


def test_max_length_caps_the_width_when_it_is_not_a_multiple_of_8():
    long_texts = [" ".join(WORDS * 2)] * 8
    splits = data.load_splits(text_options(max_length=12), seed=0, train_dataset={"text": long_texts, "label": [0, 1] * 4})
    batch = next(iter(data.build_loader(splits.train, splits.options, label_dtype=torch.long, batch_size=8, seed=0,
                                        train=False, padding=splits.padding)))
    assert batch["input_ids"].shape == (8, 12) and batch["attention_mask"].all()


def test_a_pair_of_columns_is_one_sentence_pair():
    rows = {"premise": ["the movie was good", "i loved this phone"], "hypothesis": ["not great", "the camera"], "label": [0, 1]}
    splits = data.load_splits(text_options(column=["premise", "hypothesis"]), seed=0, train_dataset=rows)
    expected = tokenizer()(rows["premise"], rows["hypothesis"], truncation=True, max_length=40)
    assert splits.train["input_ids"] == expected["input_ids"]
    assert splits.train["token_type_ids"] == expected["token_type_ids"] and 1 in expected["token_type_ids"][0]


def test_tokenized_rows_are_cached_for_the_second_run(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"{text},{i % 2}\n" for i, text in enumerate(sentences())))
    opts = text_options().model_copy(update={"data_files": {"train": str(path)}})
    first = data.load_splits(opts, seed=0)
    files = cache_files(datasets.config.HF_DATASETS_CACHE)
    again = data.load_splits(opts, seed=0)
    assert cache_files(datasets.config.HF_DATASETS_CACHE) == files, "nothing tokenized again"
    assert again.train.cache_files == first.train.cache_files


def test_max_length_defaults_to_the_tokenizers_limit():
    splits = data.load_splits(text_options(max_length=None), seed=0, train_dataset={"text": ["good"], "label": [1]})
    assert splits.options.text.max_length == 64  # model_max_length in the shipped tokenizer_config.json


@pytest.mark.parametrize("text, message", [
    ({"tokenizer": "byte"}, r"dataset_options\.text\.tokenizer: 'byte' is no tokenizer\.json file or tokenizer directory"),
    ({"tokenizer": None}, r"dataset_options\.text\.tokenizer: None"),
])
def test_classification_needs_a_real_tokenizer(text, message):
    opts = DatasetOptions(task="classification", text=text, validation_split=0.0)
    with pytest.raises(ConfigError, match=message):
        data.load_splits(opts, seed=0, train_dataset={"text": ["good"], "label": [1]})


def test_per_row_path_is_refused_for_padded_text():
    opts = text_options().model_copy(update={"vectorization": False})
    splits = data.load_splits(opts, seed=0, train_dataset={"text": ["good", "bad"], "label": [1, 0]})
    with pytest.raises(ConfigError, match="vectorization"):
        data.build_loader(splits.train, splits.options, label_dtype=torch.long, batch_size=2, seed=0, train=True,
                          padding=splits.padding)


def test_a_tokenizer_json_file_tokenizes_like_its_transformers_directory():
    texts = sentences(16)
    by_file = data.load_splits(text_options(tokenizer=str(TOKENIZER / "tokenizer.json")), seed=0,
                               train_dataset={"text": texts, "label": [0, 1] * 8})
    assert by_file.train["input_ids"] == tokenizer()(texts, truncation=True, max_length=40)["input_ids"]
    assert by_file.padding == {"input_ids": 0}, "[PAD] found in its vocabulary; no token_type_ids for single texts"
