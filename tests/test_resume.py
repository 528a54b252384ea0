"""Checkpoints people can trust: SIGKILL at any moment, then resume, gives the same weights bit for bit."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import BatchSampler

from accelerated_trainer import AcceleratedTrainer
from accelerated_trainer.data import EpochSampler

from conftest import REPO, digits_config

CRASH_RUN = str(REPO / "tests" / "helpers" / "crash_run.py")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
SETTINGS = ["training_options.n_epochs=3", "training_options.save_every_n_steps=10",
            "training_options.early_stopping=null", "experiment_options.wandb.mode=disabled"]


# PYTHONFAULTHANDLER in the launches below: a process that aborts (a rare gloo SIGABRT, "terminate
# called without an active exception", not yet explained) prints every thread's Python stack.
def cli(script, run_root, *extra, processes=1, env=None, port=29641):
    args = [script, "--config", "configs/digits.json", "--quiet", "--set", f"experiment_options.ckpt_dir={run_root}"]
    args += [a for setting in [*SETTINGS, *extra] for a in ("--set", setting)]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *args]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)


def final_weights(run_root):
    return load_file(str(Path(run_root) / "digits-mlp" / "last" / "model.safetensors"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference runs, with 1 and with 2 processes."""
    runs = {}
    for processes in (1, 2):
        root = tmp_path_factory.mktemp(f"straight{processes}")
        result = cli("train.py", root, processes=processes)
        assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-4000:]
        runs[processes] = final_weights(root)
    return runs


@pytest.mark.parametrize("crash_at, resumes_from", [
    ("step:35", "last"),  # mid-epoch 1; the step-30 checkpoint is 7 batches into it
    ("seal:3", "last"),  # while writing the epoch-0 checkpoint: the step-20 one stands
    # Between the renames of the step-40 save: the old `last` is `previous` already, the new one,
    # complete, is still `.last.tmp`; the resume completes the save instead of dropping it.
    ("publish:5", "last"),
])
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted, crash_at, resumes_from):
    crashed = cli(CRASH_RUN, tmp_path, env={"CRASH_AT": crash_at})
    assert crashed.returncode == -9, crashed.stdout[-1500:] + crashed.stderr[-4000:]
    interrupted = tmp_path / "digits-mlp" / ".last.tmp"
    # The step of the save a publish crash cut short (an epoch end's save can be taken a few steps late).
    cut_short = json.loads((interrupted / "state.json").read_text())["step"] if crash_at.startswith("publish") else None
    resumed = cli("train.py", tmp_path, "experiment_options.resume=true")
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-4000:]
    assert f"continuing from {tmp_path / 'digits-mlp' / resumes_from}" in resumed.stdout
    assert (f"completed the save of step {cut_short}" in resumed.stdout) == crash_at.startswith("publish")
    assert_bitwise_equal(final_weights(tmp_path), uninterrupted[1])
    index = json.loads((tmp_path / "digits-mlp" / "checkpoints.json").read_text())
    on_disk = sorted(str(p.relative_to(tmp_path / "digits-mlp")) for p in (tmp_path / "digits-mlp" / "top").iterdir())
    assert on_disk == sorted(e["path"] for e in index["top_k"]), "the index lists exactly what is on disk"


def test_sigkill_of_one_rank_then_resume_with_two_processes(tmp_path, uninterrupted):
    crashed = cli(CRASH_RUN, tmp_path, processes=2, env={"CRASH_AT": "step:23", "CRASH_RANK": "1"}, port=29643)
    assert crashed.returncode != 0
    state = json.loads((tmp_path / "digits-mlp" / "last" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["num_processes"]) == (20, 1, 2)  # 8 batches into epoch 1
    resumed = cli("train.py", tmp_path, "experiment_options.resume=true", processes=2, port=29645)
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-4000:]
    assert_bitwise_equal(final_weights(tmp_path), uninterrupted[2])

    # The same 2-process checkpoint resumed by 1 process: reported, and it runs to the end.
    (tmp_path / "again").mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "digits-mlp" / "previous"), str(tmp_path / "again" / "from2")], check=True)
    one = cli("train.py", tmp_path / "again", f"experiment_options.resume={tmp_path / 'again' / 'from2'}")
    assert one.returncode == 0, one.stdout[-1500:] + one.stderr[-4000:]
    assert "written by 2 processes, this run has 1" in one.stdout


@pytest.mark.parametrize("processes_before, processes_after", [(2, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("batches_done", [0, 1, 5])
def test_resharding_mid_epoch_neither_repeats_nor_skips(processes_before, processes_after, batches_done):
    """What accelerate's sharded batch sampler serves after a resume with another process count."""
    from accelerate.data_loader import BatchSamplerShard

    sampler = EpochSampler(1000, seed=3, shuffle=True)
    sampler.set_epoch(2)
    permutation = sampler.permutation().tolist()
    consumed = batches_done * 32 * processes_before
    sampler.start = consumed
    served = []
    for rank in range(processes_after):
        shard = BatchSamplerShard(BatchSampler(sampler, 32, False), processes_after, rank, even_batches=False)
        served += [i for batch in shard for i in batch]
    assert sorted(served) == sorted(permutation[consumed:])
    assert not set(served) & set(permutation[:consumed])


def test_resume_never_unpickles_and_no_file_is_a_pickle(tmp_path, monkeypatch):
    AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 1})).train()
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 2},
                                                     experiment_options={"resume": True}))

    def refuse(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    result = trainer.train()
    assert result.steps == 46
    run_dir = tmp_path / "digits-mlp"
    for path in run_dir.rglob("*"):
        if path.is_file() and "wandb" not in path.parts:
            assert path.suffix in (".json", ".jsonl", ".safetensors"), path
            assert path.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK"), path


def test_truncated_last_falls_back_to_previous_and_deletes_nothing(tmp_path):
    AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 2})).train()
    run_dir = tmp_path / "digits-mlp"
    weights = run_dir / "last" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = sorted(p for p in run_dir.rglob("*") if p.is_file())
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 2},
                                                     experiment_options={"resume": True}))
    trainer.checkpointer.resume()
    assert trainer.state.step == 23  # previous: the end of epoch 0
    assert sorted(p for p in run_dir.rglob("*") if p.is_file()) == before, "the fallback deletes nothing"
