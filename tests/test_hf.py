"""Hugging Face models from the config (hf.py), never downloading, and checkpoints and exports that
from_pretrained opens; text classification from the shipped config through the CLI."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from accelerated_trainer import AcceleratedTrainer, ConfigError, export_model, load_exported
from accelerated_trainer.config import ModelOptions
from accelerated_trainer.models import build_model

from conftest import REPO, digits_config

TINY_BERT = REPO / "data" / "reviews" / "tiny-bert"  # config.json and tokenizer, no weights
REVIEWS = REPO / "data" / "reviews"


def reviews(split, n=None):
    with open(REVIEWS / f"{split}.csv") as rows:
        rows = list(csv.DictReader(rows))[:n]
    return {"text": [row["text"] for row in rows], "label": [row["label"] for row in rows]}


def text_config(tmp_path, model_options, **training):
    config = digits_config(tmp_path, dataset_options={"data_files": {}, "feature_columns": [], "label_column": "label",
                                                      "batch_size": 32, "text": {"tokenizer": str(TINY_BERT), "max_length": 64}},
                           training_options={"n_epochs": 2, "monitor": "val_accuracy", "loss_function": None,
                                             "optimizer": {"name": "AdamW", "lr": 0.005}, "scheduler": "constant",
                                             "save_top_k": 1, **training},
                           experiment_options={"title": "bert"})
    config["model_options"] = model_options
    return config


def pretrained_dir(tmp_path, num_labels=2):
    """A local 'pretrained' tiny BERT classifier: the shipped config, seeded random weights, the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(1)
    model = BertForSequenceClassification(AutoConfig.from_pretrained(str(TINY_BERT), num_labels=num_labels))
    directory = tmp_path / "pretrained"
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(TINY_BERT)).save_pretrained(str(directory))
    return directory, model


def test_hf_config_builds_a_classifier_sized_and_named_from_the_data(tmp_path):
    config = text_config(tmp_path, {"hf_config": str(TINY_BERT / "config.json")}, n_epochs=4)
    trainer = AcceleratedTrainer(None, config, train_dataset=reviews("train", 640), eval_dataset=reviews("validation", 100))
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "positive"} and model.config.num_labels == 2
    assert trainer.config.model_options.auto_class == "AutoModelForSequenceClassification"
    result = trainer.train()
    assert result.metrics["val_accuracy"] > 0.6, result.metrics

    # best/ (and top/*, last/) are save_pretrained directories.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for name in ("best", "last", result.best_checkpoint.relative_to(result.run_dir).as_posix()):
        loaded = AutoModelForSequenceClassification.from_pretrained(str(result.run_dir / name), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(result.run_dir / name), local_files_only=True)
        assert loaded.config.id2label == {0: "negative", 1: "positive"} and tokenizer("good")["input_ids"][0] == 2
        saved = load_file(str(result.run_dir / name / "model.safetensors"))
        assert all(torch.equal(loaded.state_dict()[key], value) for key, value in saved.items())


def test_pretrained_directory_loads_its_weights_and_its_tokenizer(tmp_path):
    directory, original = pretrained_dir(tmp_path)
    config = text_config(tmp_path, {"pretrained": str(directory)})
    config["dataset_options"]["text"].pop("tokenizer")  # the model directory's tokenizer
    trainer = AcceleratedTrainer(None, config, train_dataset=reviews("train", 64), eval_dataset=reviews("validation", 32))
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.state_dict().items()), "the directory's weights"
    assert trainer.config.dataset_options.text.tokenizer == str(directory)


def test_auto_class_and_kwargs_choose_the_class_and_set_its_config():
    from accelerated_trainer import hf

    options = ModelOptions(hf_config=str(TINY_BERT), auto_class="BertForMaskedLM", kwargs={"hidden_dropout_prob": 0.0})
    model, resolved = hf.build_model(options, "classification", {"num_classes": 2}, None)
    assert type(model).__name__ == "BertForMaskedLM" and resolved.auto_class == "BertForMaskedLM"
    assert model.config.hidden_dropout_prob == 0.0
    with pytest.raises(ConfigError, match="model_options.auto_class: transformers has no class 'AutoModelForNothing'"):
        hf.build_model(ModelOptions(hf_config=str(TINY_BERT), auto_class="AutoModelForNothing"), "classification", {}, None)


def test_a_pretrained_head_of_another_size_says_how_to_start_it_afresh(tmp_path):
    from accelerated_trainer import hf

    directory, _ = pretrained_dir(tmp_path, num_labels=3)
    info = {"num_classes": 2, "label_names": ["negative", "positive"]}
    with pytest.raises(ConfigError, match=r"do not fit a model with 2 outputs.*ignore_mismatched_sizes"):
        hf.build_model(ModelOptions(pretrained=str(directory)), "classification", info, directory)
    model, _ = hf.build_model(ModelOptions(pretrained=str(directory), kwargs={"ignore_mismatched_sizes": True}),
                              "classification", info, directory)
    assert model.classifier.out_features == 2


def test_regression_has_one_output_and_the_models_own_loss(tmp_path):
    rows = reviews("train", 96)
    rows["label"] = [1.0 if label == "positive" else -1.0 for label in rows["label"]]
    config = text_config(tmp_path, {"hf_config": str(TINY_BERT)}, task="regression", monitor="val_mse", n_epochs=1)
    trainer = AcceleratedTrainer(None, config, train_dataset=rows)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert "val_mae" in trainer.train().metrics


def test_a_name_neither_local_nor_cached_is_a_config_error_exit_2(tmp_path):
    command = [sys.executable, "train.py", "--config", "configs/text_classification.json", "--quiet",
               "--set", "model_options.hf_config=null", "--set", "model_options.pretrained=nobody/no-such-model-xyz",
               "--set", f"experiment_options.ckpt_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model_options.pretrained: 'nobody/no-such-model-xyz' is neither a directory" in result.stderr
    assert "never downloads" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["transformers:BertForSequenceClassification", "transformers:AutoModelForSequenceClassification"])
def test_a_transformers_class_as_name_says_how_to_build_it(name):
    with pytest.raises(ConfigError, match=r"model_options\.name: .* is a Hugging Face class.*model_options\.pretrained.*hf_config"):
        build_model(ModelOptions(name=name))


def test_name_and_pretrained_together_are_refused():
    from accelerated_trainer.config import load_config

    with pytest.raises(ConfigError, match="name two models"):
        load_config({"dataset_options": {}, "model_options": {"name": "mlp", "pretrained": "somewhere"}})


def test_resume_of_last_and_load_exported(tmp_path):
    config = text_config(tmp_path, {"hf_config": str(TINY_BERT)})
    data = {"train_dataset": reviews("train", 128), "eval_dataset": reviews("validation", 64)}
    first = AcceleratedTrainer(None, config, **data).train()
    config["training_options"]["n_epochs"] = 3
    config["experiment_options"]["resume"] = True
    resumed = AcceleratedTrainer(None, config, **data).train()
    assert resumed.steps == 3 * 4 and first.steps == 2 * 4

    out = export_model(resumed.run_dir, tmp_path / "export", checkpoint="last")
    assert json.loads((out / "trainer_config.json").read_text())["model_options"]["hf_config"] == str(TINY_BERT)
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    model = load_exported(out)
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    last = load_file(str(resumed.run_dir / "last" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in last.items())


def test_cli_fine_tunes_a_local_bert_directory_and_its_export_opens_with_from_pretrained(tmp_path):
    """The shipped text-classification config, pointed at a local pretrained directory, through the CLI only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory, _ = pretrained_dir(tmp_path)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train.py", "--config", "configs/text_classification.json", "--quiet",
               "--set", "model_options.hf_config=null", "--set", f"model_options.pretrained={directory}",
               "--set", "dataset_options.text.tokenizer=null", "--set", "training_options.n_epochs=3",
               "--set", f"experiment_options.ckpt_dir={tmp_path}", "--set", "experiment_options.wandb.mode=disabled"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "reviews-tiny-bert"
    best = json.loads((run_dir / "checkpoints.json").read_text())["best"]["value"]

    out = tmp_path / "exported"
    exported = subprocess.run([sys.executable, "-m", "accelerated_trainer.export", str(run_dir), str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    model = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    validation = reviews("validation")
    with torch.no_grad():
        inputs = tokenizer(validation["text"], padding=True, truncation=True, max_length=64, return_tensors="pt")
        predicted = [model.config.id2label[i] for i in model(**inputs).logits.argmax(-1).tolist()]
    accuracy = sum(p == label for p, label in zip(predicted, validation["label"])) / len(predicted)
    assert accuracy == pytest.approx(best, abs=1e-6), "the export is the best checkpoint, scored the same way"
    assert best > 0.7
