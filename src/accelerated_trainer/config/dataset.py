"""dataset_options: where the data is and how batches are built."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from .base import _Named, _Section
from .training import TASK_METRICS

TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class TextOptions(_Section):
    column: Union[str, list[str]] = "text"
    """Column holding the text (plain .txt files load into a column named text); for
    classification and regression also a pair of columns, tokenized as a sentence pair."""
    tokenizer: str | None = None
    """byte (UTF-8 bytes, 256 ids), char (one id per character of the data), or the path of a
    local tokenizer: a tokenizer.json file, or a directory saved by transformers (classification
    and regression need one of these). null: the tokenizer of the model_options.pretrained
    directory, else byte."""
    block_size: int = Field(128, ge=1)
    """language_modeling: tokens per example: the token stream is cut into blocks of this
    length, and each block's labels are the same tokens shifted by one (next-token targets)."""
    max_length: int | None = Field(None, ge=1)
    """classification and regression: tokens per row at most (longer rows are truncated);
    null: the tokenizer's model_max_length, or 512 when it names none."""
    sample_by: Literal["document", "line"] = "document"
    """How .txt files become rows: each file one document, or one row per line (line breaks
    kept, so the token stream is the same, and rows tokenize in parallel with num_proc)."""

    @field_validator("column")
    @classmethod
    def _one_or_two_columns(cls, column):
        if isinstance(column, list) and len(column) not in (1, 2):
            raise ValueError(f"give one text column or a pair of them, not {len(column)}")
        return column[0] if isinstance(column, list) and len(column) == 1 else column


class TransformOptions(_Named):
    name: str
    """Import path package.module:function of a batched datasets.map function: it gets a dict of
    column lists (and kwargs) and returns a dict of new or replaced columns."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the function."""
    batch_size: int = Field(1000, ge=1)
    """Rows per call."""
    remove_columns: bool = False
    """Drop the existing columns, keeping only what the function returns (needed when it changes
    the number of rows)."""


class DatasetOptions(_Section):
    task: Literal[tuple(TASK_METRICS)] | None = None
    """The same as training_options.task, where the original spec puts it; give it in either
    place (or the same in both). A loaded config holds it in both."""
    data_files: dict[str, Union[str, list[str]]] = Field(default_factory=dict)
    """Split name (train, validation, test) to a path or glob, or a list of them, resolved against
    the current directory. Format from the extension: .parquet, .csv, .json/.jsonl, .arrow, .txt;
    a directory is one written by datasets' save_to_disk (for a DatasetDict, the split of that name)."""
    feature_columns: list[str] = Field(default_factory=list)
    """The model's first argument: one array column, or several scalar columns stacked into
    (batch, n). Left out (and no input_columns): the data's columns other than the label, when
    that is one column or scalar columns only; with language-modelling `text`, input_ids."""
    input_columns: list[str] = Field(default_factory=list)
    """Columns passed to the model as keyword arguments of the same name, e.g. input_ids and
    attention_mask for a transformers model. Integer columns become int64, float ones float32,
    booleans bool."""
    label_column: str = "label"
    """Column holding the class index (classification) or the target value (regression); with
    `text`, labels (next-token ids)."""
    dtypes: dict[str, Literal[TORCH_DTYPES]] = Field(default_factory=dict)
    """Tensor dtype by batch key (features, labels, or an input column), overriding the defaults:
    float32 features (int64 token ids with `text`), labels by task."""
    text: TextOptions | None = None
    """Text to tokenize. language_modeling: the token stream packed into fixed-length blocks
    with next-token labels (columns input_ids and labels). classification and regression: each
    row tokenized on its own, truncated to max_length, and each batch padded to its longest row
    (input_ids, attention_mask, and token_type_ids where the tokenizer makes them)."""
    transforms: list[TransformOptions] = Field(default_factory=list)
    """Batched datasets.map functions applied in order to every split after loading (before
    `text`); their results are cached by datasets, so a second run skips the work."""
    train_batch_transform: str | None = None
    """Import path package.module:function applied to every training batch (a dict of tensors
    on the device, returned as a dict of tensors), e.g. on-the-fly augmentation; never to
    validation batches."""
    num_proc: int = Field(1, ge=1)
    """Processes for transforms and tokenization (datasets.map num_proc)."""
    batch_size: int = Field(32, gt=0)
    """Training batch size per process."""
    eval_batch_size: int | None = Field(None, gt=0)
    """Validation batch size per process; defaults to batch_size."""
    validation_split: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of train held out (seeded) when no validation file is given; 0 means no validation."""
    shuffle: bool = True
    """Shuffle training data each epoch; the order is a function of (seed, epoch)."""
    drop_last: bool = False
    """Drop the last incomplete training batch."""
    vectorization: bool = True
    """Fetch each batch in one gather (fast). False fetches rows one by one and stacks them
    with a collate function, for datasets that need one."""
    preload_max_mb: int = Field(4096, ge=0)
    """RAM (MB, per process) for contiguous copies of the numeric columns, from which each batch
    is one index_select. Beyond it, data read from files gets its copy written once to the
    datasets cache and memory-mapped (shared by processes, larger than RAM works); in-memory data
    falls back to one Arrow take per batch. A single-chunk column of the batch dtype is used in
    place and costs nothing. 0: no copies in RAM."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes."""

    @model_validator(mode="after")
    def _columns_for_text(self) -> "DatasetOptions":
        # Packed text has its own columns; a task of None is a section built alone (language modelling, as before).
        if self.text is not None and self.task in (None, "language_modeling"):
            if isinstance(self.text.column, list):
                raise ValueError("dataset_options.text.column: a pair of columns is for classification and regression, "
                                 "not language_modeling")
            if not self.feature_columns and not self.input_columns:
                self.feature_columns = ["input_ids"]
            if "label_column" not in self.model_fields_set:
                self.label_column = "labels"
        return self
