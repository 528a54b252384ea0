"""The real command line: `python train.py` and `accelerate launch train.py`."""

import json
import os
import subprocess
import sys

from conftest import REPO

TRAIN = [sys.executable, str(REPO / "train.py")]


def run(args, env=None, timeout=300):
    environment = {**os.environ, "WANDB_MODE": "", **(env or {})}
    environment.pop("WANDB_MODE")
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment)


def test_main_job_trains_digits_with_offline_wandb(tmp_path):
    # The shipped config, unchanged but for where it writes: the README's main job.
    result = run([*TRAIN, "--config", "configs/digits.json", "--quiet", "--set", f"experiment_options.ckpt_dir={tmp_path}"],
                 env={"WANDB_API_KEY": "", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "digits-mlp"
    index = json.loads((run_dir / "checkpoints.json").read_text())
    assert index["best"]["value"] >= 0.95
    assert len(index["top_k"]) == 3 and all((run_dir / e["path"] / "model.safetensors").is_file() for e in index["top_k"])
    assert "run finished" in result.stdout and "best val_accuracy" in result.stdout
    # No credentials: W&B ran offline, said so, and its run is the one the checkpoint remembers.
    assert "logging offline" in result.stdout
    run_id = json.loads((run_dir / "last" / "state.json").read_text())["run_id"]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 1000


def test_config_error_exits_2_with_a_short_message(tmp_path):
    result = run([*TRAIN, "--config", "configs/digits.json", "--set", "training_options.n_epoch=3"])
    assert result.returncode == 2
    assert "training_options.n_epoch: unknown key; did you mean 'training_options.n_epochs'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_and_missing_data_exit_2(tmp_path):
    missing = run([*TRAIN, "--config", str(tmp_path / "absent.json")])
    assert missing.returncode == 2 and "absent.json" in missing.stderr and "does not exist" in missing.stderr
    no_data = run([*TRAIN, "--config", "configs/digits.json", "--set", f"experiment_options.ckpt_dir={tmp_path}",
                   "--set", "experiment_options.wandb.mode=disabled",
                   "--set", "dataset_options.data_files.train=data/digits/nope.parquet"])
    assert no_data.returncode == 2
    assert "dataset_options.data_files.train" in no_data.stderr and "nope.parquet" in no_data.stderr
    assert "Traceback" not in no_data.stderr
    assert not (tmp_path / "digits-mlp" / "last").exists()


def test_help_and_print_config():
    help_text = run([*TRAIN, "--help"])
    assert help_text.returncode == 0 and "--set" in help_text.stdout and "accelerate launch" in help_text.stdout
    printed = run([*TRAIN, "--config", "configs/digits.json", "--print-config", "--set", "training_options.n_epochs=5"])
    assert printed.returncode == 0
    resolved = json.loads(printed.stdout)
    assert resolved["training_options"]["n_epochs"] == 5
    assert resolved["training_options"]["mode"] == "max"  # default filled in from the monitored metric


def test_print_run_dir_is_absolute_and_never_imports_torch(tmp_path):
    # The cluster script asks for the run directory in its batch shell, before anything starts.
    probe = ("import sys; from accelerated_trainer.cli import main; "
             "code = main(['--config', 'configs/digits.json', '--print-run-dir', '--set', 'experiment_options.ckpt_dir=rel']); "
             "print('torch' in sys.modules, code)")
    result = run([sys.executable, "-c", probe], env={"PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(REPO / "rel" / "digits-mlp"), "False 0"]


def test_a_preempted_run_leaves_a_marker_of_its_attempt_and_the_next_start_removes_it(tmp_path):
    settings = ["--quiet", "--set", f"experiment_options.ckpt_dir={tmp_path}", "--set", "experiment_options.trackers=[]"]
    slurm = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"}
    stopped = run([*TRAIN, "--config", "configs/digits.json", *settings, "--set", "training_options.n_epochs=1000",
                   "--set", "training_options.max_time_s=0.5"], env=slurm)
    assert stopped.returncode == 99, stopped.stderr[-2000:]
    run_dir = tmp_path / "digits-mlp"
    marker = json.loads((run_dir / "preempted.json").read_text())
    step = json.loads((run_dir / "last" / "state.json").read_text())["step"]
    assert marker == {"slurm_job_id": "7", "slurm_restart_count": "2", "step": step, "reason": "max_time_s reached"}
    # The same job attempt relaunched (a cluster script's retry), failing for real: its marker is gone.
    failed = run([*TRAIN, "--config", "configs/digits.json", *settings, "--set", "experiment_options.resume=true",
                  "--set", "dataset_options.label_column=nope"], env=slurm)
    assert failed.returncode == 2 and "label_column" in failed.stderr
    assert not (run_dir / "preempted.json").exists()
