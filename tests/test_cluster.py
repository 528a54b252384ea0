"""From laptop to cluster: data parallelism equivalence, two "machines", dead ranks, preemption.

Real processes on CPU (gloo) through accelerate launch, as a cluster job would run them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from accelerated_trainer import AcceleratedTrainer

from conftest import REPO, digits_config

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CRASH_RUN = str(REPO / "tests" / "helpers" / "crash_run.py")
BASE = ["experiment_options.wandb.mode=disabled", "training_options.early_stopping=null"]


def command(run_root, *settings, processes=1, machines=1, rank=0, port=29671, script="train.py"):
    args = [script, "--config", "configs/digits.json", "--quiet", "--set", f"experiment_options.ckpt_dir={run_root}"]
    args += [a for s in [*BASE, *settings] for a in ("--set", s)]
    if processes == 1 and machines == 1:
        return [sys.executable, *args]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", str(machines),
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no", *args]


def environment(**extra):
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}


def run(cmd, timeout=300, **env):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment(**env))


def start(cmd, **env):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(**env), start_new_session=True)


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row["train_loss"] for row in rows if "train_loss" in row]


def weights(run_root):
    return load_file(str(Path(run_root) / "digits-mlp" / "last" / "model.safetensors"))


def test_two_processes_follow_the_one_process_loss_curve(tmp_path):
    """2 processes x batch 32 against 1 process x batch 64: the same global batches, the same curve."""
    same = ["training_options.max_steps=20", "training_options.log_every_n_steps=1", "model_options.kwargs.dropout=0"]
    one = run(command(tmp_path / "one", *same, "dataset_options.batch_size=64"))
    two = run(command(tmp_path / "two", *same, "dataset_options.batch_size=32", processes=2))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    curve_one, curve_two = losses(tmp_path / "one" / "digits-mlp"), losses(tmp_path / "two" / "digits-mlp")
    assert len(curve_one) == len(curve_two) == 20
    assert torch.allclose(torch.tensor(curve_one), torch.tensor(curve_two), rtol=1e-4, atol=1e-5), (curve_one, curve_two)


def test_two_machines_on_localhost_agree_with_one_machine(tmp_path):
    settings = ["training_options.n_epochs=2"]
    single = run(command(tmp_path / "single", *settings, processes=2, port=29673))
    assert single.returncode == 0, single.stdout[-1500:] + single.stderr[-4000:]
    # One launch per "machine", one process each, meeting at 127.0.0.1.
    launches = [start(command(tmp_path / "multi", *settings, processes=2, machines=2, rank=rank, port=29675))
                for rank in (0, 1)]
    outputs = [launch.communicate(timeout=300) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0].count("run finished") == 1 and "run finished" not in outputs[1][0]
    multi, reference = weights(tmp_path / "multi"), weights(tmp_path / "single")
    for name in reference:
        assert torch.allclose(multi[name], reference[name], atol=1e-6), name


def test_a_dead_rank_fails_the_other_machine_fast_with_a_clear_message(tmp_path):
    settings = ["training_options.n_epochs=5", "experiment_options.distributed_timeout_s=60"]
    began = time.monotonic()
    survivor = start(command(tmp_path, *settings, processes=2, machines=2, rank=0, port=29677))
    victim = start(command(tmp_path, *settings, processes=2, machines=2, rank=1, port=29677, script=CRASH_RUN),
                   CRASH_AT="step:5", CRASH_RANK="1")
    victim.communicate(timeout=300)
    _, errors = survivor.communicate(timeout=300)
    assert survivor.returncode != 0
    assert "lost contact with another process of this job" in errors
    assert "experiment_options.resume=true" in errors
    assert time.monotonic() - began < 120


def test_multi_gpu_launch_without_gpus_is_refused_with_the_right_command(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(command(tmp_path, processes=2, port=29679), cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode != 0
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in result.stderr
    assert not (tmp_path / "digits-mlp" / "last").exists()


def sigterm_when_training(process, run_dir, after_rows=3):
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_rows:
            os.kill(process.pid, signal.SIGTERM)
            return
        time.sleep(0.01)
    raise AssertionError("training never started or ended before the signal")


def test_sigterm_saves_a_complete_checkpoint_and_resume_continues_exactly(tmp_path):
    settings = ["training_options.n_epochs=6", "training_options.log_every_n_steps=1"]
    straight = run(command(tmp_path / "straight", *settings))
    assert straight.returncode == 0, straight.stderr[-2000:]

    process = start(command(tmp_path / "cut", *settings))
    sigterm_when_training(process, tmp_path / "cut" / "digits-mlp")
    output, errors = process.communicate(timeout=300)
    assert process.returncode == 99, errors[-2000:]
    assert "preempted by SIGTERM" in output
    state = json.loads((tmp_path / "cut" / "digits-mlp" / "last" / "state.json").read_text())
    assert 0 < state["step"] < 6 * 23

    resumed = run(command(tmp_path / "cut", *settings, "experiment_options.resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference, after = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(reference[name], after[name]) for name in reference)


def test_sigterm_to_a_two_process_launch_saves_once_and_resumes_exactly(tmp_path):
    settings = ["training_options.n_epochs=8", "training_options.log_every_n_steps=1"]
    straight = run(command(tmp_path / "straight", *settings, processes=2, port=29681))
    assert straight.returncode == 0, straight.stderr[-2000:]

    process = start(command(tmp_path / "cut", *settings, processes=2, port=29683))
    sigterm_when_training(process, tmp_path / "cut" / "digits-mlp")
    output, errors = process.communicate(timeout=300)
    assert process.returncode != 0  # the launcher reports its workers' exit code 99 as a failure
    assert "preempted by SIGTERM" in output
    state = json.loads((tmp_path / "cut" / "digits-mlp" / "last" / "state.json").read_text())
    assert 0 < state["step"] < 8 * 12 and state["num_processes"] == 2

    resumed = run(command(tmp_path / "cut", *settings, "experiment_options.resume=true", processes=2, port=29685))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference, after = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(reference[name], after[name]) for name in reference)


def test_max_time_stops_like_a_preemption(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 500, "max_time_s": 1.0})
    result = AcceleratedTrainer(None, config).train()
    assert result.preempted and result.stop_reason == "max_time_s reached"
    state = json.loads((tmp_path / "digits-mlp" / "last" / "state.json").read_text())
    assert state["step"] == result.steps < 500 * 23
