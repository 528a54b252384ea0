"""Config validation: every error names the JSON path; every shipped config loads."""

import json
from pathlib import Path

import pytest

from accelerated_trainer.config import ConfigError, json_schema, load_config

from conftest import REPO, digits_config

CONFIG_FILES = sorted(p for p in (REPO / "configs").rglob("*") if p.suffix in (".json", ".yaml", ".yml") and p.name != "schema.json")


def test_there_are_configs_to_check():
    assert len(CONFIG_FILES) > 0


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.model_options is not None, "shipped configs are CLI runs and name their model"


def test_shipped_schema_is_current():
    shipped = json.loads((REPO / "configs" / "schema.json").read_text())
    assert shipped == json_schema(), "regenerate with: python train.py --schema > configs/schema.json"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        # a typo names the path and the close match
        (lambda c: c["dataset_options"].update(batch_sise=3), ["dataset_options.batch_sise", "dataset_options.batch_size"]),
        (lambda c: c.update(trainng_options={}), ["trainng_options", "training_options"]),
        (lambda c: c["training_options"]["optimizer"].update(lrr=0.1), ["training_options.optimizer.lrr", "training_options.optimizer.lr"]),
        # a wrong type names the path and the bad value
        (lambda c: c["dataset_options"].update(batch_size="big"), ["dataset_options.batch_size", '"big"']),
        (lambda c: c["training_options"].update(n_epochs=0), ["training_options.n_epochs", "greater than or equal to 1"]),
        (lambda c: c["training_options"].update(mixed_precision="fp8"), ["training_options.mixed_precision", "'bf16'"]),
        (lambda c: c["experiment_options"].update(resume=3.5), ["experiment_options.resume", "3.5"]),
        # a metric the task does not produce
        (lambda c: c["training_options"].update(monitor="val_acc"), ["training_options.monitor", "val_accuracy"]),
    ],
)
def test_invalid_config_names_the_path(tmp_path, mutate, expected):
    config = digits_config(tmp_path)
    mutate(config)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"dataset_options": {')
    with pytest.raises(ConfigError, match="bad.json.*not valid JSON"):
        load_config(path)


def test_yaml_config_and_overrides(tmp_path):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(tmp_path)))
    config = load_config(path, ["training_options.n_epochs=7", "training_options.optimizer.lr=0.5",
                                "experiment_options.title=other", "model_options.kwargs.hidden_dims=[8,8]"])
    assert config.training_options.n_epochs == 7
    assert config.training_options.optimizer.lr == 0.5
    assert config.experiment_options.title == "other"
    assert config.model_options.kwargs["hidden_dims"] == [8, 8]
    assert config.run_dir == Path(tmp_path) / "other"


def test_override_into_a_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="training_options.n_epochs is a value"):
        load_config(digits_config(tmp_path), ["training_options.n_epochs.x=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(digits_config(tmp_path), ["no_equals_sign"])


def test_shorthands_of_the_original_spec(tmp_path):
    config = digits_config(tmp_path, training_options={"early_stopping": 4, "loss_function": "NLLLoss", "optimizer": "SGD"})
    options = load_config(config).training_options
    assert options.early_stopping.patience == 4
    assert options.loss_function.name == "NLLLoss"
    assert options.optimizer.name == "SGD"


@pytest.mark.parametrize("monitor, mode", [("val_loss", "min"), ("val_accuracy", "max")])
def test_mode_follows_the_monitored_metric(tmp_path, monitor, mode):
    config = digits_config(tmp_path, training_options={"monitor": monitor})
    config["training_options"].pop("mode", None)
    assert load_config(config).training_options.mode == mode


def test_configured_metrics_can_be_monitored(tmp_path):
    config = digits_config(tmp_path, training_options={
        "monitor": "val_f1", "metrics": {"f1": {"name": "F1Score", "kwargs": {"average": "macro"}}, "auroc": "AUROC"}})
    config["training_options"].pop("mode", None)
    options = load_config(config).training_options
    assert options.monitor == "val_f1" and options.metrics["auroc"].name == "AUROC"
    assert options.mode is None, "the metric's own higher_is_better decides, once it is built"
    assert load_config(config, metrics=["top5"]).training_options.metrics.keys() == {"f1", "auroc"}
    config["training_options"]["monitor"] = "val_top5"
    with pytest.raises(ConfigError, match="training_options.monitor.*val_f1"):
        load_config(config)
    assert load_config(config, metrics=["top5"]).training_options.monitor == "val_top5"  # a metric given to the Python API


@pytest.mark.parametrize("metrics, fragment", [
    ({"accuracy": "Accuracy"}, "val_accuracy"),  # the built-in one already has that name
    ({"f 1": "F1Score"}, "letters, digits and underscores"),
    ({"f1": {"name": "F1Score", "kwarg": {}}}, "training_options.metrics.f1.kwarg"),
])
def test_invalid_metrics_name_the_path(tmp_path, metrics, fragment):
    with pytest.raises(ConfigError, match="training_options.metrics") as err:
        load_config(digits_config(tmp_path, training_options={"metrics": metrics}))
    assert fragment in str(err.value)


def test_restore_best_defaults_to_true(tmp_path):
    assert load_config(digits_config(tmp_path)).training_options.restore_best is True


def test_config_errors_about_metrics_import_neither_torch_nor_torchmetrics(tmp_path):
    import subprocess
    import sys

    config = digits_config(tmp_path, training_options={"metrics": {"f1": "F1Score"}, "monitor": "val_f2"})
    code = ("import json, sys; from accelerated_trainer.config import ConfigError, load_config\n"
            f"try:\n    load_config(json.loads({json.dumps(json.dumps(config))}))\nexcept ConfigError as err:\n    print(err)\n"
            "print(sorted(m for m in ('torch', 'torchmetrics') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "val_f2" in completed.stdout and completed.stdout.strip().endswith("[]"), completed.stdout + completed.stderr


# The original spec's config, verbatim: task and vectorization under dataset_options, an integer patience.
SPEC_CONFIG = {"dataset_options": {"task": "classification", "vectorization": True},
               "training_options": {"n_epochs": 10, "loss_function": "CrossEntropyLoss", "early_stopping": 5},
               "experiment_options": {"ckpt_dir": "./checkpoints", "title": "MyExperiment", "wandb": {"project": "my_project"}}}


def test_the_original_spec_config_loads_verbatim():
    config = load_config(SPEC_CONFIG)
    assert config.training_options.task == config.dataset_options.task == "classification"
    assert config.training_options.early_stopping.patience == 5
    assert config.dataset_options.feature_columns == []  # taken from the data's columns at load time
    assert config.experiment_options.wandb.project == "my_project"


def test_dataset_options_task_is_the_training_task_and_its_metrics_follow():
    # training_options.monitor is checked against the task: the task given under dataset_options counts.
    config = load_config({"dataset_options": {"task": "regression"}, "training_options": {"monitor": "val_mse"}})
    assert config.training_options.task == "regression" and config.training_options.mode == "min"
    with pytest.raises(ConfigError, match=r"training_options\.monitor: task 'regression' produces"):
        load_config({"dataset_options": {"task": "regression"}, "training_options": {"monitor": "val_accuracy"}})
    again = load_config(config.model_dump(mode="json"))  # a run's config.json holds the task in both places
    assert again.training_options.task == again.dataset_options.task == "regression"


def test_two_different_tasks_are_refused_naming_both_keys():
    with pytest.raises(ConfigError) as err:
        load_config({"dataset_options": {"task": "regression"}, "training_options": {"task": "classification"}})
    assert "dataset_options.task" in str(err.value) and "training_options.task" in str(err.value)
    assert load_config({"dataset_options": {"task": "regression"}, "training_options": {"task": "regression"}})
