"""Text for classification and regression: each row tokenized on its own, no packing.

A batched `datasets.map` (cached under a fingerprint of the data, the tokenizer's files and the
settings, run in `num_proc` processes) turns the text column, or a pair of columns, into
`input_ids` (and `token_type_ids` where the tokenizer makes them), with the tokenizer's special
tokens and truncation to `max_length`. Rows keep their own lengths: padding.py pads each batch
to its longest row and builds the `attention_mask`, so nothing is padded here.

Tokenizers: a directory saved by transformers (AutoTokenizer, local files only), or a
tokenizer.json file (the tokenizers library).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import ConfigError, DatasetOptions
from .padding import MASK
from .text import TOKEN_IDS, _check_text_column, _digest

TYPE_IDS = "token_type_ids"
DEFAULT_MAX_LENGTH = 512  # when the tokenizer names no model_max_length
# A model directory may hold the tokenizer beside the weights: those are no part of its fingerprint.
_WEIGHTS = {".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".gguf", ".ckpt"}


def tokenize_rows(splits: dict, options: DatasetOptions, sources: dict[str, str]) -> tuple[dict, DatasetOptions, dict[str, int]]:
    """Each split's text as token ids per row; the options with the model's inputs and
    max_length filled in; the pad value of each token column.

    Raises:
        ConfigError: the tokenizer is not a local tokenizer file or directory, or input_columns
            names something the tokenizer does not make.
        DataError: a text column is missing or not text.
    """
    text = options.text
    text_columns = [text.column] if isinstance(text.column, str) else list(text.column)
    for name, dataset in splits.items():
        for column in text_columns:
            _check_text_column(dataset, column, name, sources[name])
    spec = _spec(text.tokenizer, pair=len(text_columns) == 2)
    tokenizer = _load(json.dumps(spec))
    max_length = text.max_length or tokenizer.max_length
    made = [TOKEN_IDS, MASK] + [TYPE_IDS] * tokenizer.type_ids
    if unknown := [name for name in options.input_columns if name not in made]:
        raise ConfigError(f"dataset_options.input_columns: the tokenizer makes {made}, not {unknown}; leave input_columns out "
                          "to pass all of them.")
    num_proc = options.num_proc if options.num_proc > 1 else None
    tokenized = {}
    for name, dataset in splits.items():
        tokenized[name] = dataset.with_format("arrow").map(
            _tokenize, batched=True,
            fn_kwargs={"columns": text_columns, "spec": spec, "max_length": max_length, "label": options.label_column},
            remove_columns=dataset.column_names,
            num_proc=num_proc, desc=f"tokenizing {name}").with_format(None)
    resolved = options.model_copy(update={"input_columns": list(options.input_columns) or made,
                                          "text": text.model_copy(update={"max_length": max_length})})
    padding = {TOKEN_IDS: tokenizer.pad_id} | ({TYPE_IDS: 0} if tokenizer.type_ids else {})
    return tokenized, resolved, padding


def _spec(name: str | None, pair: bool) -> dict:
    # A JSON-able description, so datasets can hash it for the cache and worker processes can rebuild it.
    path = Path(name).expanduser().resolve() if name else None
    if path is not None and path.is_file():
        return {"kind": "tokenizers", "path": str(path), "sha256": _digest([path]), "pair": pair}
    if path is not None and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix not in _WEIGHTS)
        return {"kind": "transformers", "path": str(path), "sha256": _digest(files), "pair": pair}
    raise ConfigError(f"dataset_options.text.tokenizer: {name!r} is no tokenizer.json file or tokenizer directory; text "
                      "classification and regression need a local tokenizer (byte and char are for language_modeling), "
                      "or a model_options.pretrained directory that holds one.")


class _Tokenizer:
    """A local tokenizer with special tokens and truncation; `type_ids`: whether it makes token_type_ids."""

    def __init__(self, spec: dict):
        self.pair = spec["pair"]
        if spec["kind"] == "tokenizers":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(spec["path"])
            self.tokenizer.no_padding()
            padding = self.tokenizer.padding
            self.pad_id = (padding or {}).get("pad_id") or _first_id(self.tokenizer, ("[PAD]", "<pad>", "<|pad|>"))
            self.type_ids, self.max_length = self.pair, DEFAULT_MAX_LENGTH
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ConfigError(f"dataset_options.text.tokenizer: reading {spec['path']} needs transformers: "
                                  'pip install "accelerated-trainer[text]".') from None
            self.tokenizer = AutoTokenizer.from_pretrained(spec["path"], local_files_only=True)
            self.pad_id = self.tokenizer.pad_token_id or 0
            self.type_ids = TYPE_IDS in self.tokenizer.model_input_names
            limit = self.tokenizer.model_max_length
            self.max_length = limit if isinstance(limit, int) and limit < 1_000_000 else DEFAULT_MAX_LENGTH

    def encode(self, texts: list[list[str]], max_length: int) -> tuple[list[list[int]], list[list[int]] | None]:
        if hasattr(self.tokenizer, "encode_batch"):
            self.tokenizer.enable_truncation(max_length)
            encodings = self.tokenizer.encode_batch(list(zip(*texts)) if self.pair else texts[0], add_special_tokens=True)
            return [e.ids for e in encodings], [e.type_ids for e in encodings] if self.type_ids else None
        out = self.tokenizer(*texts, truncation=True, max_length=max_length, return_attention_mask=False,
                             return_token_type_ids=self.type_ids)
        return out["input_ids"], out[TYPE_IDS] if self.type_ids else None


def _first_id(tokenizer, tokens) -> int:
    ids = [tokenizer.token_to_id(token) for token in tokens]
    return next((i for i in ids if i is not None), 0)


@functools.lru_cache(maxsize=4)
def _load(spec_json: str) -> _Tokenizer:
    return _Tokenizer(json.loads(spec_json))


def _tokenize(batch: pa.Table, *, columns: list[str], spec: dict, max_length: int, label: str) -> pa.Table:
    texts = [[text or "" for text in batch.column(column).to_pylist()] for column in columns]
    ids, type_ids = _load(json.dumps(spec)).encode(texts, max_length)
    out = {TOKEN_IDS: _lists(ids)}
    if type_ids is not None:
        out[TYPE_IDS] = _lists(type_ids)
    if label in batch.column_names:  # the only other column kept (a test split may have none)
        out[label] = batch.column(label)
    return pa.table(out)


def _lists(rows: list[list[int]]) -> pa.Array:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    values = np.fromiter((v for row in rows for v in row), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
