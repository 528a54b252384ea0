"""Credentials in the environment never reach the run directory: config, logs, checkpoints, W&B files."""

from accelerated_trainer import AcceleratedTrainer

from conftest import digits_config

SECRET = "0123456789abcdef0123456789abcdef01234567"


def test_api_key_is_nowhere_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    config = digits_config(tmp_path, training_options={"n_epochs": 1},
                           experiment_options={"wandb": {"mode": "offline"}})
    AcceleratedTrainer(None, config).train()
    files = [p for p in (tmp_path / "digits-mlp").rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files), "the W&B offline run is part of the check"
    leaking = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaking == []
