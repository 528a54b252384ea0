"""imports.py: the objects a config names by import path."""

import sys

import pytest

from accelerated_trainer.config import ConfigError
from accelerated_trainer.imports import import_object


def test_a_module_in_the_current_directory_is_importable(tmp_path, monkeypatch):
    # train.py puts its own directory on sys.path, not the one the user runs it from.
    (tmp_path / "my_prep_for_imports_test.py").write_text("def double(batch):\n    return batch * 2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    function = import_object("my_prep_for_imports_test:double", "dataset_options.transforms", kind="function")
    assert function(21) == 42


def test_a_missing_module_is_still_a_config_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"dataset_options\.train_batch_transform: cannot import 'nowhere_xyz:f'.*current directory"):
        import_object("nowhere_xyz:f", "dataset_options.train_batch_transform", kind="function")
