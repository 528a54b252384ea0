"""The run configuration: one validated object built from a JSON/YAML file or a dict.

Every default lives here, in the pydantic models; components receive their own section.
Errors name the JSON path, the bad value and, for a typo, the closest valid key.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

TASK_METRICS = {
    "classification": ("val_loss", "val_accuracy"),
    "regression": ("val_loss", "val_mae", "val_mse"),
    "language_modeling": ("val_loss", "val_accuracy", "val_perplexity"),
}
TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
MAXIMIZED_METRICS = {"val_accuracy"}


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class _Named(_Section):
    @model_validator(mode="before")
    @classmethod
    def _expand_name(cls, value: Any) -> Any:
        # "AdamW" is shorthand for {"name": "AdamW"}: the common case stays one word in the config.
        return {"name": value} if isinstance(value, str) else value


class TextOptions(_Section):
    column: str = "text"
    """Column holding the text (plain .txt files load into a column named text)."""
    tokenizer: str = "byte"
    """byte (UTF-8 bytes, 256 ids), char (one id per character of the data), or the path of a
    local tokenizer: a tokenizer.json file, or a directory saved by transformers."""
    block_size: int = Field(128, ge=1)
    """Tokens per example: the token stream is cut into blocks of this length, and each block's
    labels are the same tokens shifted by one (next-token targets)."""
    sample_by: Literal["document", "line"] = "document"
    """How .txt files become rows: each file one document, or one row per line (line breaks
    kept, so the token stream is the same, and rows tokenize in parallel with num_proc)."""


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
    data_files: dict[str, Union[str, list[str]]] = Field(default_factory=dict)
    """Split name (train, validation, test) to a path or glob, or a list of them, resolved against
    the current directory. Format from the extension: .parquet, .csv, .json/.jsonl, .arrow, .txt;
    a directory is one written by datasets' save_to_disk (for a DatasetDict, the split of that name)."""
    feature_columns: list[str] = Field(default_factory=list)
    """The model's first argument: one array column, or several scalar columns stacked into
    (batch, n). May be empty when input_columns name every input; with `text`, input_ids."""
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
    """Language-modelling text: tokenize the text column, pack it into fixed-length blocks with
    next-token labels (columns input_ids and labels)."""
    transforms: list[TransformOptions] = Field(default_factory=list)
    """Batched datasets.map functions applied in order to every split after loading (before
    `text`); their results are cached by datasets, so a second run skips the work."""
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
        if self.text is not None:
            if not self.feature_columns and not self.input_columns:
                self.feature_columns = ["input_ids"]
            if "label_column" not in self.model_fields_set:
                self.label_column = "labels"
        if not self.feature_columns and not self.input_columns:
            raise ValueError("required key dataset_options.feature_columns is missing (or empty): name the feature "
                             "column(s), or the model's keyword inputs in dataset_options.input_columns")
        return self


class LossOptions(_Named):
    name: str
    """Any torch.nn loss class, e.g. CrossEntropyLoss, MSELoss, SmoothL1Loss."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the loss, e.g. {"label_smoothing": 0.1}."""


class OptimizerOptions(_Named):
    name: str = "AdamW"
    """Any torch.optim optimizer class."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay passed to the optimizer."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further optimizer arguments, e.g. {"betas": [0.9, 0.95]}."""


class SchedulerOptions(_Named):
    name: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate shape after warmup: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0 to lr."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warmup as a fraction of all optimizer steps (used when warmup_steps is 0)."""


class EarlyStoppingOptions(_Section):
    patience: int = Field(5, ge=1)
    """Evaluations without improvement of the monitored metric before training stops."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change of the monitored metric that counts as an improvement."""

    @model_validator(mode="before")
    @classmethod
    def _expand_patience(cls, data: Any) -> Any:
        # The original spec's `"early_stopping": 5` means a patience of 5 evaluations.
        return {"patience": data} if isinstance(data, int) and not isinstance(data, bool) else data


class TrainingOptions(_Section):
    task: Literal["classification", "regression", "language_modeling"] = "classification"
    """Chooses the default loss and the validation metrics; language_modeling scores next-token
    class outputs (batch, positions, vocabulary) and adds val_perplexity."""
    n_epochs: int = Field(10, ge=1)
    """Passes over the training data (training also stops at max_steps if set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps, whatever n_epochs says."""
    loss_function: LossOptions | None = None
    """A torch.nn loss by name (string or {"name", "kwargs"}). Default: CrossEntropyLoss for
    classification and language_modeling, MSELoss for regression. A model that returns its own loss
    (HF ModelOutput.loss or a dict with "loss") uses that instead."""
    optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    """Optimizer by name, with lr and weight decay."""
    scheduler: SchedulerOptions = Field(default_factory=SchedulerOptions)
    """Learning-rate schedule with warmup."""
    seed: int = 42
    """Seeds model init, data order and dropout on every process."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision; fp16 needs a GPU, bf16 runs on recent CPUs and GPUs."""
    eval_every_n_steps: int | None = Field(None, ge=1)
    """Validate every N optimizer steps; null validates at the end of each epoch."""
    log_every_n_steps: int = Field(10, ge=1)
    """Optimizer steps between training-loss logs (the only host syncs of the loss)."""
    save_every_n_steps: int | None = Field(None, ge=1)
    """Also write the resumable `last` checkpoint every N optimizer steps."""
    monitor: str = "val_loss"
    """Validation metric that ranks checkpoints and drives early stopping."""
    mode: Literal["min", "max"] | None = None
    """Whether a lower or higher monitored value is better; default from the metric."""
    early_stopping: EarlyStoppingOptions | None = None
    """Stop when the monitored metric stops improving; an integer is the patience."""
    save_top_k: int = Field(3, ge=-1)
    """Keep the k best checkpoints by the monitored metric; -1 keeps all, 0 none."""
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: stop (checked at each log, evaluation and save: no per-step host sync;
    `last` keeps the last good state) or skip the optimizer step and count it (one host sync
    per optimizer step)."""
    max_time_s: float | None = Field(None, gt=0)
    """Wall-clock budget in seconds: when spent, finish the step, save `last` and exit as if
    preempted (exit code 99), so a scheduler can requeue the job and it resumes."""

    @field_validator("monitor")
    @classmethod
    def _check_monitor(cls, monitor: str, info: ValidationInfo) -> str:
        allowed = TASK_METRICS.get(info.data.get("task"), ())
        if allowed and monitor not in allowed:
            close = difflib.get_close_matches(monitor, allowed, n=1)
            hint = f"; did you mean {close[0]!r}" if close else ""
            raise ValueError(f"task {info.data['task']!r} produces {list(allowed)}, not {monitor!r}{hint}")
        return monitor

    @model_validator(mode="after")
    def _default_mode(self) -> "TrainingOptions":
        if self.mode is None:
            self.mode = "max" if self.monitor in MAXIMIZED_METRICS else "min"
        return self


class WandbOptions(_Section):
    project: str = "accelerated-trainer"
    """W&B project name."""
    mode: Literal["online", "offline", "disabled"] | None = None
    """null: online when W&B credentials are configured, offline otherwise."""
    entity: str | None = None
    """W&B team or user."""
    tags: list[str] = Field(default_factory=list)
    """Tags for the run."""
    group: str | None = None
    """Group name, e.g. for a sweep."""
    notes: str | None = None
    """Free-text notes for the run."""


class ExperimentOptions(_Section):
    title: str = Field("run", min_length=1, pattern=r"^[^/\\]+$")
    """Run name: the run directory is {ckpt_dir}/{title} and the W&B run name."""
    ckpt_dir: str = "runs"
    """Parent directory of run directories."""
    resume: Union[bool, str] = False
    """true: continue from the run directory's last checkpoint (start fresh if there is none);
    a path: continue from that checkpoint directory."""
    overwrite: bool = False
    """Allow a fresh run into a run directory that already holds checkpoints (they are deleted)."""
    trackers: list[Literal["wandb", "tensorboard"]] = Field(default_factory=lambda: ["wandb"])
    """Trackers that receive every logged value through accelerate: wandb, tensorboard (event
    files under {run_dir}/tensorboard), both, or [] for none. metrics.jsonl is always written;
    wandb.mode "disabled" also turns wandb off."""
    wandb: WandbOptions = Field(default_factory=WandbOptions)
    """Weights & Biases settings, used when trackers lists wandb."""
    progress_bar: bool = True
    """tqdm progress bars on the main process."""
    preemption_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every process finish its step, save `last` and exit with code 99."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """A checkpoint write that fails (disk full, permission denied): stop with the error, or warn
    and keep training. Either way the earlier checkpoints and the index stay intact."""
    distributed_timeout_s: float = Field(600, gt=0)
    """How long a collective may wait for another process before the job fails (a dead or hung rank)."""

    @field_validator("trackers")
    @classmethod
    def _unique_trackers(cls, trackers: list[str]) -> list[str]:
        # accelerate would start a tracker listed twice only once; say it once here too.
        return list(dict.fromkeys(trackers))


class ModelOptions(_Named):
    name: str = "mlp"
    """A built-in model (mlp) or an import path package.module:Class."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor keyword arguments."""


class TrainerConfig(_Section):
    dataset_options: DatasetOptions
    """Where the data is and how batches are built."""
    training_options: TrainingOptions = Field(default_factory=TrainingOptions)
    """Loss, optimizer, schedule, precision, cadences, checkpoint ranking, early stopping."""
    experiment_options: ExperimentOptions = Field(default_factory=ExperimentOptions)
    """Run name and directory, resume, tracking."""
    model_options: ModelOptions | None = None
    """The model for CLI runs; the Python API takes a model object instead."""

    @property
    def run_dir(self) -> Path:
        return Path(self.experiment_options.ckpt_dir) / self.experiment_options.title


# ---------------------------------------------------------------- loading and errors


def load_config(source: Union[TrainerConfig, dict, str, Path], overrides: list[str] = ()) -> TrainerConfig:
    """Build a validated config from a dict, a JSON/YAML file path, or a config object.

    Args:
        source: the config as a dict, a path to a .json/.yaml/.yml file, or a TrainerConfig.
        overrides: "dotted.path=value" strings applied on top; value is parsed as JSON
            when it parses, else taken as a string.
    Raises:
        ConfigError: the file is missing or unreadable, or a value is invalid.
    """
    if isinstance(source, TrainerConfig):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = json.loads(json.dumps(source))  # deep copy; also rejects non-JSON values early
    else:
        raw = _read_file(Path(source))
    for override in overrides:
        _apply_override(raw, override)
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, raw, origin=None if isinstance(source, (dict, TrainerConfig)) else source)) from None


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a JSON or YAML config.")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read as UTF-8 text: {err}.") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold an object with sections, got {type(data).__name__}.")
    return data


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. training_options.n_epochs=3.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *parents, leaf = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            path = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {override!r}: {path} is a value, not a section, so it has no key {leaf!r}.")
        node = child
    node[leaf] = value


def _describe(err: ValidationError, raw: dict, origin: Any) -> str:
    where = f" in {str(origin)!r}" if origin is not None else ""
    problems: dict[str, list[str]] = {}
    for problem in err.errors():
        loc = _user_path(raw, problem["loc"], missing=problem["type"] == "missing")
        path = ".".join(str(part) for part in loc) or "(top level)"
        if problem["type"] == "extra_forbidden":
            text = f"unknown key{_suggest(loc)}"
        elif problem["type"] == "missing":
            text = "required key is missing"
        else:
            text = problem["msg"].removeprefix("Value error, ").rstrip(".")
            if not isinstance(problem.get("input"), dict):
                text += f" (got {json.dumps(problem.get('input'), default=str)})"
        # A union (e.g. resume: bool or path) fails once per member: say it once, joined by "or".
        problems.setdefault(path, []).append(text)
    details = " ".join(f"{path}: {' or '.join(dict.fromkeys(texts))}." for path, texts in problems.items())
    return f"invalid config{where}: {details}"


def _user_path(raw: Any, loc: tuple, missing: bool) -> list:
    """The part of a pydantic location that names keys of the input.

    pydantic adds union-member tags ("bool", "str", "function-after[...]") to locations; a part
    that is not a key (or index) of the input at that depth is such a tag.
    """
    path, node = [], raw
    for depth, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing and depth == len(loc) - 1):
            continue
        path.append(part)
    return path


def _suggest(loc: list) -> str:
    if not loc:
        return ""
    fields = _fields_at(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {'.'.join(map(str, loc[:-1] + [close[0]]))!r}"
    return f"; valid keys here: {', '.join(sorted(fields))}" if fields else ""


def _fields_at(loc: list) -> list[str]:
    model: Any = TrainerConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
    return list(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def json_schema() -> dict:
    """The JSON Schema of the config file, as shipped in configs/schema.json."""
    schema = TrainerConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "accelerated-trainer config"
    return schema
