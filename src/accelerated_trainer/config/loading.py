"""The whole config and how it is loaded.

TrainerConfig holds the four sections; load_config builds it from a file, a dict or --set
overrides, and turns pydantic's errors into one ConfigError that names the JSON path and the fix.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Union

from pydantic import BaseModel, Field, ValidationError, model_validator

from .base import ConfigError, _Section
from .dataset import DatasetOptions
from .experiment import ExperimentOptions
from .model import ModelOptions
from .training import TrainingOptions


class TrainerConfig(_Section):
    dataset_options: DatasetOptions
    """Where the data is and how batches are built."""
    training_options: TrainingOptions = Field(default_factory=TrainingOptions)
    """Loss, optimizer, schedule, precision, cadences, checkpoint ranking, early stopping."""
    experiment_options: ExperimentOptions = Field(default_factory=ExperimentOptions)
    """Run name and directory, resume, tracking."""
    model_options: ModelOptions | None = None
    """The model for CLI runs; the Python API takes a model object instead."""

    @model_validator(mode="before")
    @classmethod
    def _one_task(cls, data: Any) -> Any:
        """The task in both sections: the original spec puts it under dataset_options, and each
        section's checks read it (training_options.monitor, dataset_options.text)."""
        if not isinstance(data, dict) or not isinstance(data.get("dataset_options"), dict):
            return data
        dataset, training = data["dataset_options"], data.get("training_options", {})
        if not isinstance(training, dict):
            return data
        given = {key: section["task"] for key, section in (("dataset_options.task", dataset), ("training_options.task", training))
                 if section.get("task") is not None}
        if len(set(map(str, given.values()))) > 1:
            raise ValueError(f"dataset_options.task is {given['dataset_options.task']!r} but training_options.task is "
                             f"{given['training_options.task']!r}; they are the same setting: give the task in one place")
        task = next(iter(given.values()), TrainingOptions.model_fields["task"].default)
        return {**data, "dataset_options": {**dataset, "task": task}, "training_options": {**training, "task": task}}

    @property
    def run_dir(self) -> Path:
        return Path(self.experiment_options.ckpt_dir) / self.experiment_options.title

    @property
    def checkpoint(self) -> "CheckpointOptions":
        """The checkpoint settings, gathered from training_options and experiment_options."""
        training, experiment = self.training_options, self.experiment_options
        return CheckpointOptions(
            monitor=training.monitor, mode=training.mode, save_top_k=training.save_top_k,
            save_every_n_steps=training.save_every_n_steps, resume=experiment.resume, overwrite=experiment.overwrite,
            async_save=experiment.async_save, on_save_error=experiment.on_save_error)


@dataclass(frozen=True)
class CheckpointOptions:
    """The Checkpointer's settings (documented where they live in the config file)."""

    monitor: str
    mode: Literal["min", "max"]
    save_top_k: int
    save_every_n_steps: int | None
    resume: Union[bool, str]
    overwrite: bool
    async_save: bool
    on_save_error: Literal["stop", "continue"]


# ---------------------------------------------------------------- loading and errors


def load_config(source: Union[TrainerConfig, dict, str, Path], overrides: list[str] = (), *,
                metrics: Iterable[str] = ()) -> TrainerConfig:
    """Build a validated config from a dict, a JSON/YAML file path, or a config object.

    Args:
        source: the config as a dict, a path to a .json/.yaml/.yml file, or a TrainerConfig.
        overrides: "dotted.path=value" strings applied on top; value is parsed as JSON
            when it parses, else taken as a string.
        metrics: names of metrics given to the Python API, which training_options.monitor may
            name (as val_<name>) beside the configured ones.
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
        return TrainerConfig.model_validate(raw, context={"metrics": list(metrics)})
    except ValidationError as err:
        origin = None if isinstance(source, (dict, TrainerConfig)) else source
        raise ConfigError(_describe(err, raw, origin, list(overrides))) from None


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


def _describe(err: ValidationError, raw: dict, origin: Any, overrides: list[str]) -> str:
    """One paragraph: each invalid JSON path, what is wrong there, and, for a value that an override
    set, that override (the file is named only for what came from it)."""
    problems: dict[str, list[str]] = {}
    from_file = False
    for problem in err.errors():
        loc = _user_path(raw, problem["loc"], missing=problem["type"] == "missing")
        path = ".".join(str(part) for part in loc) or "(top level)"
        override = _override_of(loc, overrides)
        from_file |= override is None
        if override is not None:
            path += f" (from --set {override})"
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
    where = f" in {str(origin)!r}" if origin is not None and from_file else ""
    return f"invalid config{where}: {details}"


def _override_of(loc: list, overrides: list[str]) -> str | None:
    """The last override that set the value at `loc` or one of its sections (the last one wins)."""
    path = [str(part) for part in loc]
    for override in reversed(overrides):
        keys = [part.strip() for part in override.partition("=")[0].strip().split(".")]
        if path[: len(keys)] == keys:
            return override
    return None


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
