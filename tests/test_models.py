"""models.py: built-in models, the sizes they take from the data, and import paths; the
Shakespeare example config run through the CLI."""

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_model, save_model

from accelerated_trainer.config import ConfigError, ModelOptions
from accelerated_trainer.models import BUILTIN, CharTransformer, build_model, resolve

from conftest import REPO

SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


def char_model(**kwargs):
    torch.manual_seed(0)
    return CharTransformer(**{"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16, **kwargs})


def test_char_transformer_is_causal():
    model = char_model().eval()
    tokens = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (3, 8, 11)
    assert torch.equal(before[:, :5], after[:, :5]), "no position sees a later token"
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_char_transformer_ties_output_to_embedding_and_survives_safetensors(tmp_path):
    model = char_model()
    assert model.head.weight is model.token_embedding.weight
    save_model(model, str(tmp_path / "model.safetensors"))
    loaded = char_model(n_layer=2)
    torch.nn.init.zeros_(loaded.token_embedding.weight)
    load_model(loaded, str(tmp_path / "model.safetensors"))
    assert loaded.head.weight is loaded.token_embedding.weight
    assert torch.equal(loaded.head.weight, model.token_embedding.weight)


def test_char_transformer_rejects_sequences_longer_than_its_block():
    with pytest.raises(ValueError, match="longer than block_size 8"):
        char_model()(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("name, data_info, kwargs, expected", [
    ("mlp", {"input_dim": 64, "num_classes": 10}, {"hidden_dims": [8]}, {"hidden_dims": [8], "input_dim": 64, "output_dim": 10}),
    ("mlp", {"input_dim": 3}, {}, {"input_dim": 3, "output_dim": 1}),  # regression: one output
    ("mlp", {"input_dim": 3, "num_classes": 4}, {"output_dim": 6}, {"input_dim": 3, "output_dim": 6}),  # wider is fine
    ("char_transformer", {"input_dim": 64, "num_classes": 65, "vocab_size": 65, "block_size": 64}, {"n_embd": 32},
     {"n_embd": 32, "vocab_size": 65, "block_size": 64}),
    ("char_transformer", {"vocab_size": 65, "block_size": 64}, {"block_size": 128}, {"vocab_size": 65, "block_size": 128}),
    ("torch.nn:Linear", {"input_dim": 3}, {"in_features": 3, "out_features": 1}, {"in_features": 3, "out_features": 1}),
])
def test_resolve_fills_in_what_the_data_decides(name, data_info, kwargs, expected):
    resolved = resolve(ModelOptions(name=name, kwargs=kwargs), data_info)
    assert resolved.name == name and resolved.kwargs == expected
    build_model(resolved)


@pytest.mark.parametrize("name, data_info, kwargs, message", [
    ("mlp", {"input_dim": 64, "num_classes": 10}, {"output_dim": 5},
     r"model_options\.kwargs\.output_dim is 5 but the data has num_classes 10; raise it to at least 10"),
    ("mlp", {"input_dim": 64}, {"input_dim": 32}, r"model_options\.kwargs\.input_dim is 32 but the data has input_dim 64; set it to 64"),
    ("mlp", {"num_classes": 2}, {}, r"mlp takes input_dim from the data's input_dim, which this data does not give"),
    ("char_transformer", {"vocab_size": 65, "block_size": 64}, {"vocab_size": 50}, r"kwargs\.vocab_size is 50 but the data has vocab_size 65"),
    ("char_transformer", {"vocab_size": 65, "block_size": 64}, {"block_size": 32}, r"kwargs\.block_size is 32 .* at least 64"),
])
def test_resolve_rejects_sizes_that_do_not_fit_the_data(name, data_info, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        resolve(ModelOptions(name=name, kwargs=kwargs), data_info)


def test_builtin_names():
    assert set(BUILTIN) == {"mlp", "char_transformer"}


@pytest.mark.parametrize("name, message", [
    ("transformer", "neither a built-in model"),
    ("no_such_module:Model", "cannot import module 'no_such_module'"),
    ("torch.nn:NoSuchLayer", "has no attribute 'NoSuchLayer'"),
])
def test_unknown_model_names_say_what_is_accepted(name, message):
    with pytest.raises(ConfigError, match=message):
        build_model(ModelOptions(name=name))


def test_kwargs_that_do_not_fit_the_constructor_name_its_signature():
    with pytest.raises(ConfigError, match=r"do not fit char_transformer \(CharTransformer\(vocab_size"):
        build_model(ModelOptions(name="char_transformer", kwargs={"vocab_size": 5, "block_size": 4, "layers": 3}))


# ---------------------------------------------------------------- configs/shakespeare_char.json


def unigram_loss(text: str) -> float:
    """Cross-entropy (nats per character) of predicting each character by its frequency alone."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log(n / len(text)) for n in counts.values())


def test_shakespeare_config_learns_far_beyond_character_frequencies(tmp_path):
    # The shipped config, shortened: 150 steps of the 1000 it runs, validated at the end.
    command = [sys.executable, "train.py", "--config", "configs/shakespeare_char.json", "--quiet",
               "--set", f"experiment_options.ckpt_dir={tmp_path}", "--set", "experiment_options.wandb.mode=disabled",
               "--set", "training_options.max_steps=150", "--set", "training_options.eval_every_n_steps=150"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    run_dir = tmp_path / "shakespeare-char"
    validation = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [row["step"] for row in validation] == [150]
    metrics = validation[-1]
    baseline = unigram_loss(SHAKESPEARE.read_text())  # about 3.3 nats
    assert metrics["val_loss"] < baseline - 0.5, (metrics, baseline)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-6)
    assert 0.2 < metrics["val_accuracy"] < 1
    kwargs = json.loads((run_dir / "config.json").read_text())["model_options"]["kwargs"]
    assert kwargs["vocab_size"] == len(set(SHAKESPEARE.read_text())) == 65 and kwargs["block_size"] == 64
