"""Shared fixtures: the shipped digits data and a small, fast config around it."""

import copy
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "data" / "digits"

# No test may reach a hub or a tracking server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def digits_config(run_root: Path, **sections) -> dict:
    """configs/digits.json made small: 2 epochs, no tracker, no progress bar, runs under run_root.

    Keyword arguments update the named sections, e.g. training_options={"n_epochs": 3}.
    """
    config = json.loads((REPO / "configs" / "digits.json").read_text())
    config["dataset_options"]["data_files"] = {
        "train": str(DIGITS / "train.parquet"),
        "validation": str(DIGITS / "validation.parquet"),
    }
    config["training_options"].update(n_epochs=2, early_stopping=None)
    config["experiment_options"].update(ckpt_dir=str(run_root), progress_bar=False, wandb={"mode": "disabled"})
    for section, values in sections.items():
        config.setdefault(section, {})
        config[section].update(copy.deepcopy(values))
    return config


@pytest.fixture
def small_config(tmp_path):
    return digits_config(tmp_path)
