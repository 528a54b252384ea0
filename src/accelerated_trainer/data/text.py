"""Text for language modelling: tokenize a text column, then pack the token stream into blocks.

Both steps are batched `datasets.map` calls over Arrow batches, so they run in `num_proc`
processes and land in the datasets cache: a second run with the same files and settings loads
the packed blocks instead of tokenizing again. A block is `block_size` token ids (`input_ids`)
and the next `block_size` ids (`labels`): consecutive blocks overlap by one token, so every
transition of the stream is trained on exactly once. The labels column is typed
`ClassLabel(vocabulary)`, which tells `describe` the vocabulary size and, for `char`, the characters.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import ConfigError, DatasetOptions
from .sources import DataError

TOKEN_IDS, TARGETS = "input_ids", "labels"


def tokenize_and_pack(splits: dict[str, object], options: DatasetOptions, sources: dict[str, str]) -> dict[str, object]:
    """Each split's text as packed blocks of token ids with next-token labels.

    Raises:
        ConfigError: the tokenizer is neither built in nor a readable local tokenizer.
        DataError: the text column is missing or not text, or a split is shorter than one block.
    """
    from datasets import ClassLabel, Features, List, Value

    text = options.text
    for name, dataset in splits.items():
        _check_text_column(dataset, text.column, name, sources[name])
    spec = _tokenizer_spec(text.tokenizer or "byte", splits.values(), text.column)
    vocabulary = ClassLabel(names=list(spec["chars"])) if spec["kind"] == "char" else ClassLabel(num_classes=_load(json.dumps(spec)).vocab_size)
    features = Features({TOKEN_IDS: List(Value("int64"), length=text.block_size), TARGETS: List(vocabulary, length=text.block_size)})
    num_proc = options.num_proc if options.num_proc > 1 else None
    packed = {}
    for name, dataset in splits.items():
        ids = dataset.with_format("arrow").map(
            _tokenize, batched=True, fn_kwargs={"column": text.column, "spec": spec},
            remove_columns=dataset.column_names, num_proc=num_proc, desc=f"tokenizing {name}")
        blocks = ids.map(
            _pack, batched=True, fn_kwargs={"block_size": text.block_size}, remove_columns=ids.column_names,
            features=features, num_proc=num_proc, desc=f"packing {name} into blocks of {text.block_size}")
        if len(blocks) == 0:
            raise DataError(f"the {name} text from {sources[name]} has fewer than dataset_options.text.block_size + 1 = "
                            f"{text.block_size + 1} tokens; give more text or a smaller block_size.")
        packed[name] = blocks.with_format(None)
    return packed


def _check_text_column(dataset, column: str, split: str, source: str) -> None:
    import pyarrow.types as types

    if column not in dataset.column_names:
        raise DataError(f"dataset_options.text.column: column {column!r} is not in the {split} data from {source}; "
                        f"its columns are {dataset.column_names}.")
    kind = dataset.data.table.schema.field(column).type
    if not (types.is_string(kind) or types.is_large_string(kind)):
        raise DataError(f"dataset_options.text.column: column {column!r} of the {split} data holds {kind}, not text.")


# ---------------------------------------------------------------- tokenizers


def _tokenizer_spec(name: str, datasets_, column: str) -> dict:
    # A JSON-able description, so datasets can hash it for the cache and worker processes can rebuild it.
    if name == "byte":
        return {"kind": "byte"}
    if name == "char":
        return {"kind": "char", "chars": _characters(datasets_, column)}
    path = Path(name).expanduser().resolve()
    if path.is_file():
        return {"kind": "tokenizers", "path": str(path), "sha256": _digest([path])}
    if (path / "tokenizer.json").is_file():
        return {"kind": "tokenizers", "path": str(path / "tokenizer.json"), "sha256": _digest([path / "tokenizer.json"])}
    if path.is_dir():
        return {"kind": "transformers", "path": str(path), "sha256": _digest(sorted(p for p in path.iterdir() if p.is_file()))}
    raise ConfigError(f"dataset_options.text.tokenizer: {name!r} is neither byte, char, nor an existing tokenizer.json "
                      "file or tokenizer directory.")


def _characters(datasets_, column: str) -> str:
    # Every split's characters, so validation text never meets an unknown one; sorted by code point.
    seen: set[str] = set()
    for dataset in datasets_:
        for batch in dataset.with_format("arrow").iter(batch_size=1000):
            for text in batch.column(column).to_pylist():
                seen.update(text or "")
    return "".join(sorted(seen))


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class _Bytes:
    vocab_size = 256

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]


class _Chars:
    def __init__(self, chars: str):
        self.chars = chars
        self.codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self.vocab_size = len(chars)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ids = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
            if not np.array_equal(self.codes[ids], codes):
                unknown = chr(int(codes[self.codes[ids] != codes][0]))
                raise DataError(f"character {unknown!r} is not in the char vocabulary built from the data.")
            out.append(ids)
        return out


class _HFTokenizer:
    def __init__(self, spec: dict):
        if spec["kind"] == "tokenizers":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(spec["path"])
            self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
            self._encode = lambda texts: [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ConfigError(f"dataset_options.text.tokenizer: {spec['path']} has no tokenizer.json; reading it "
                                  'needs transformers: pip install "accelerated-trainer[text]".') from None
            self.tokenizer = AutoTokenizer.from_pretrained(spec["path"], local_files_only=True)
            self.vocab_size = len(self.tokenizer)
            self._encode = lambda texts: self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self._encode(texts)]


@functools.lru_cache(maxsize=4)
def _load(spec_json: str):
    spec = json.loads(spec_json)
    if spec["kind"] == "byte":
        return _Bytes()
    if spec["kind"] == "char":
        return _Chars(spec["chars"])
    return _HFTokenizer(spec)


# ---------------------------------------------------------------- the two map functions


def _tokenize(batch: pa.Table, *, column: str, spec: dict) -> pa.Table:
    pieces = _load(json.dumps(spec)).encode([text or "" for text in batch.column(column).to_pylist()])
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(piece) for piece in pieces], out=offsets[1:])
    values = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)
    return pa.table({"ids": pa.LargeListArray.from_arrays(offsets, values)})


def _pack(batch: pa.Table, *, block_size: int) -> pa.Table:
    # The batch's documents as one stream; what does not fill a last block is dropped.
    stream = batch.column("ids").combine_chunks().flatten().to_numpy()
    n = max((len(stream) - 1) // block_size, 0) * block_size
    inputs, targets = pa.array(stream[:n]), pa.array(stream[1:n + 1])
    return pa.table({TOKEN_IDS: pa.FixedSizeListArray.from_arrays(inputs, block_size),
                     TARGETS: pa.FixedSizeListArray.from_arrays(targets, block_size)})
