"""`python -m accelerated_trainer.launch`: accelerate launch, with a stop told in one line (2 CPU processes)."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO


def launch(run_root, port, *settings):
    command = [sys.executable, "-m", "accelerated_trainer.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               "train.py", "--config", "configs/digits.json", "--quiet", "--set", f"experiment_options.ckpt_dir={run_root}",
               "--set", "experiment_options.trackers=[]", "--set", "training_options.n_epochs=1000", "--set",
               "training_options.log_every_n_steps=1", *[a for s in settings for a in ("--set", s)]]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_workers_stopped_preempted_end_the_launcher_with_99_and_one_line(tmp_path):
    process = launch(tmp_path, 29743, "training_options.max_time_s=1")
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 99, errors[-3000:]  # plain `accelerate launch` exits 1 here
    assert "launcher: the workers exited with code 99 (preempted, `last` saved)" in errors
    assert "Traceback" not in errors and "ChildFailedError" not in errors
    assert json.loads((tmp_path / "digits-mlp" / "preempted.json").read_text())["reason"] == "max_time_s reached"


def test_a_signalled_launcher_waits_for_its_workers_and_says_so_in_one_line(tmp_path):
    process = launch(tmp_path, 29745)
    metrics = tmp_path / "digits-mlp" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and process.poll() is None, "training never started"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)  # the launcher alone, as a scheduler's signal to the task
    output, errors = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, errors[-3000:]
    assert "launcher: got SIGTERM, passed it on to the workers and waited for them" in errors
    assert "Traceback" not in errors
    assert "run finished: preempted by SIGTERM" in output
    assert (tmp_path / "digits-mlp" / "preempted.json").is_file()
