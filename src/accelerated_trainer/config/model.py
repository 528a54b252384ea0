"""model_options: the model a CLI run builds."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from .base import _Named


class ModelOptions(_Named):
    name: str | None = None
    """A built-in model (mlp, char_transformer) or an import path package.module:Class; mlp when
    neither this, pretrained nor hf_config is given."""
    pretrained: str | None = None
    """A Hugging Face model to fine-tune, loaded with from_pretrained: a local directory (relative
    to the current directory), or a model name already in the local Hugging Face cache; nothing
    is ever downloaded."""
    hf_config: str | None = None
    """A Hugging Face model built from its config with random weights (from_config): a
    config.json file or the directory holding it."""
    auto_class: str | None = None
    """The transformers class that loads pretrained or hf_config: an Auto class or a model
    class of transformers by name (AutoModelForTokenClassification, BertForSequenceClassification),
    or package.module:Class. Default from the task: AutoModelForSequenceClassification for
    classification (num_labels and label names from the data) and regression (one output),
    AutoModelForCausalLM for language_modeling."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor keyword arguments; for a Hugging Face model, config attributes (e.g.
    hidden_dropout_prob, num_labels) update its config and the rest go to from_pretrained or
    from_config (e.g. dtype, attn_implementation, ignore_mismatched_sizes)."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelOptions":
        if self.pretrained and self.hf_config:
            raise ValueError("give model_options.pretrained (weights) or model_options.hf_config (random weights), not both")
        if self.pretrained or self.hf_config:
            if self.name is not None:
                raise ValueError("model_options.name and model_options.pretrained/hf_config name two models; leave name out "
                                 "(model_options.auto_class chooses the transformers class)")
        elif self.auto_class is not None:
            raise ValueError("model_options.auto_class chooses how model_options.pretrained or hf_config is loaded; set one of them")
        elif self.name is None:
            self.name = "mlp"
        return self
