"""Bad configs: a clear error before any work starts, and the existing run directory untouched."""

import copy

import pytest

from accelerated_trainer import AcceleratedTrainer, ConfigError

from fault_helpers import assert_intact, finished_run  # noqa: F401  (fixture)


@pytest.mark.parametrize("section, key, value, expected", [
    ("training_options", "n_epoch", 3, "training_options.n_epoch: unknown key; did you mean 'training_options.n_epochs'"),
    ("dataset_options", "batch_size", "64", None),  # a numeric string is accepted as a number
    ("dataset_options", "batch_size", [64], "dataset_options.batch_size: Input should be a valid integer (got [64])"),
    ("training_options", "save_top_k", -2, "training_options.save_top_k: Input should be greater than or equal to -1"),
    ("training_options", "monitor", "val_f1", "task 'classification' produces ['val_loss', 'val_accuracy'], not 'val_f1'"),
    ("training_options", "mixed_precision", "fp16", "fp16 needs a CUDA GPU and none is visible; use \"bf16\" on CPU"),
    ("training_options", "optimizer", {"name": "Adamm"}, "training_options.optimizer.name: 'Adamm' is not a torch.optim optimizer"),
    ("training_options", "loss_function", {"name": "CrossEntropy"}, "'CrossEntropy' is not a torch.nn loss"),
    ("model_options", "name", "nowhere.module:Net", "model_options.name: cannot import module 'nowhere.module'"),
    ("experiment_options", "resume", "/no/such/checkpoint", "experiment_options.resume: /no/such/checkpoint is not a usable checkpoint"),
])
def test_bad_config_is_refused_and_the_run_is_intact(finished_run, section, key, value, expected):
    config, run_dir, before = finished_run
    bad = copy.deepcopy(config)
    bad[section][key] = value
    if expected is None:
        bad["experiment_options"]["title"] = "other"
        AcceleratedTrainer(None, bad)  # builds fine
        return
    with pytest.raises(ConfigError) as err:
        AcceleratedTrainer(None, bad).train()
    assert expected in str(err.value)
    assert "\n" not in str(err.value).strip(), "one paragraph"
    assert_intact(run_dir, before)


def test_a_fresh_run_into_the_finished_run_is_refused(finished_run):
    config, run_dir, before = finished_run
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        AcceleratedTrainer(None, config).train()
    assert_intact(run_dir, before)
