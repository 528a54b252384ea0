"""Hugging Face transformers models from the config, and the files that make a checkpoint one
`from_pretrained` opens.

    model_options.pretrained   a local directory, or a name already in the local Hugging Face
                               cache: weights from from_pretrained (local files only)
    model_options.hf_config    a config.json or its directory: the architecture, random weights

The Auto class follows the task (classification: AutoModelForSequenceClassification with the
data's number of classes and their names; regression: the same with one output;
language_modeling: AutoModelForCausalLM); model_options.auto_class overrides it. Nothing is
ever downloaded: a name that is neither a directory nor in the cache is a ConfigError.

A transformers model's checkpoints (best/, top/*, last/) and exports hold its config.json and
the tokenizer's files beside model.safetensors, so AutoModel*.from_pretrained(dir) and
AutoTokenizer.from_pretrained(dir) open them; the trainer's own files there (meta.json,
state.json, manifest.json, ...) are names transformers does not use.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .checkpoint import ModelState
from .config import ConfigError, ModelOptions
from .imports import import_object

AUTO_CLASS = {"classification": "AutoModelForSequenceClassification", "regression": "AutoModelForSequenceClassification",
              "language_modeling": "AutoModelForCausalLM"}
# model_options.kwargs that go to from_pretrained / from_config even where the config has an attribute of the name.
LOADER_ARGUMENTS = {"dtype", "torch_dtype", "attn_implementation", "ignore_mismatched_sizes", "device_map", "low_cpu_mem_usage",
                    "use_safetensors", "revision", "trust_remote_code", "subfolder", "variant"}


def uses_transformers(options: ModelOptions | None) -> bool:
    return options is not None and bool(options.pretrained or options.hf_config)


def model_directory(options: ModelOptions | None) -> Path | None:
    """The local directory of model_options.pretrained (the cache's snapshot for a name), or None.

    Raises:
        ConfigError: neither a directory nor in the local cache; or hf_config does not exist.
    """
    if options is not None and options.hf_config and not Path(options.hf_config).exists():
        raise ConfigError(f"model_options.hf_config: {options.hf_config!r} does not exist (relative to {Path.cwd()}); give a "
                          "config.json or the directory holding it.")
    if options is None or not options.pretrained:
        return None
    path = Path(options.pretrained).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(options.pretrained, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid name (HFValidationError)
        raise ConfigError(
            f"model_options.pretrained: {options.pretrained!r} is neither a directory (relative to {Path.cwd()}) nor a model "
            "in the local Hugging Face cache, and the trainer never downloads; download it first (hf download NAME) or "
            "give the directory that save_pretrained wrote.") from None


def build_model(options: ModelOptions, task: str, data_info: dict, directory: Path | None):
    """The transformers model of the options, and the options as resolved (the auto class used).

    Raises:
        ConfigError: transformers is missing, the class or its config do not load, or the
            pretrained classifier's size does not fit the data.
    """
    transformers = _transformers()
    auto_name = options.auto_class or AUTO_CLASS[task]
    if ":" in auto_name:
        auto = import_object(auto_name, "model_options.auto_class", kind="Class")
    elif not hasattr(transformers, auto_name):
        raise ConfigError(f"model_options.auto_class: transformers has no class {auto_name!r} (e.g. {AUTO_CLASS[task]}).")
    else:
        auto = getattr(transformers, auto_name)
    source = str(directory or options.hf_config)
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        key = "pretrained" if directory else "hf_config"
        raise ConfigError(f"model_options.{key}: {source} holds no readable transformers config.json ({err}).") from None
    loader_kwargs = _configure(config, options.kwargs, task, data_info)
    try:
        if directory is not None:
            model = auto.from_pretrained(str(directory), config=config, local_files_only=True, **loader_kwargs)
        else:
            # A model class has no from_config; Auto classes call its _from_config (dtype, attn_implementation) too.
            model = (auto.from_config if hasattr(auto, "from_config") else auto._from_config)(config, **loader_kwargs)
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ConfigError(f"model_options.pretrained: the weights in {directory} do not fit a model with {config.num_labels} "
                          "outputs (its classifier was trained for another number of labels); set "
                          "model_options.kwargs.ignore_mismatched_sizes to true to start that layer afresh.") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model_options: {auto_name} cannot build {source} with kwargs {loader_kwargs}: {err}.") from None
    return model, options.model_copy(update={"auto_class": auto_name})


def _configure(config, kwargs: dict, task: str, data_info: dict) -> dict:
    """Set the config's labels from the data and its attributes from kwargs; the loader's kwargs."""
    kwargs, loader = dict(kwargs), {}
    if task == "regression":
        config.num_labels, config.problem_type = 1, "regression"
    elif task == "classification":
        names = data_info.get("label_names")
        if names is not None:
            config.id2label = dict(enumerate(names))
            config.label2id = {name: i for i, name in enumerate(names)}
        elif "num_classes" in data_info and data_info["num_classes"] != config.num_labels:
            config.num_labels = data_info["num_classes"]
        elif "num_classes" not in data_info and "num_labels" not in kwargs:
            raise ConfigError("model_options.kwargs.num_labels: this data does not say how many classes it has (torch data "
                              "is not scanned); set num_labels.")
    for key, value in kwargs.items():
        if hasattr(config, key) and key not in LOADER_ARGUMENTS:
            setattr(config, key, value)
        else:
            loader[key] = value
    return loader


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('model_options.pretrained / hf_config need transformers: pip install "accelerated-trainer[text]".') from None
    return transformers


# ---------------------------------------------------------------- checkpoints from_pretrained opens


def is_transformers_model(model) -> bool:
    """Whether `model` is a transformers PreTrainedModel (checked without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def load_tokenizer(path: str | None):
    """The tokenizer at a local path (a transformers directory, or a tokenizer.json file) to
    save beside the weights, or None for byte, char and no tokenizer."""
    if path is None or path in ("byte", "char") or not Path(path).exists():
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if Path(path).is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class PretrainedModelState(ModelState):
    """The weights of a transformers model, whose weights directories are save_pretrained ones:
    its config.json (generation_config.json) and the tokenizer's files beside model.safetensors."""

    def __init__(self, accelerator, model, tokenizer=None):
        super().__init__(accelerator, model)
        self.tokenizer = tokenizer

    def write_pretrained_files(self, directory: Path) -> None:
        module = self.module
        module.config.architectures = [type(module).__name__]  # what save_pretrained records, for AutoModel
        module.config.save_pretrained(str(directory))
        if getattr(module, "generation_config", None) is not None and module.can_generate():
            module.generation_config.save_pretrained(str(directory))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))


def model_state(accelerator, model, tokenizer_path: str | None) -> ModelState:
    """The registry's model entry: PretrainedModelState for a transformers model, else ModelState."""
    if is_transformers_model(accelerator.unwrap_model(model)):
        return PretrainedModelState(accelerator, model, load_tokenizer(tokenizer_path))
    return ModelState(accelerator, model)
