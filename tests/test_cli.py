"""The real command line: `python train.py`, the installed `accelerated-trainer`, `python -m
accelerated_trainer` and `accelerate launch`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TRAIN = [sys.executable, str(REPO / "train.py")]
BIN = Path(sys.executable).parent
# A run of a few seconds: 3 optimizer steps, no tracker, no bars.
TINY = ["--quiet", "--set", "training_options.max_steps=3", "--set", "experiment_options.trackers=[]"]


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
    # --quiet: no bars, no progress lines, nothing of wandb's or datasets' but the sync line.
    printed = (result.stdout + result.stderr).splitlines()
    assert [line for line in printed if "wandb" in line.lower() and "W&B is logging offline" not in line] == [
        f"wandb: upload this run with `wandb sync {run_dir / 'wandb'}/offline-run-*-{run_id}`"]
    assert not [line for line in printed if re.match(r"(epochs?|Generating|Flattening|Map)\b", line)]
    assert "\r" not in result.stderr and len(printed) <= 10, printed


def test_config_error_exits_2_with_a_short_message(tmp_path):
    result = run([*TRAIN, "--config", "configs/digits.json", "--set", "training_options.n_epoch=3"])
    assert result.returncode == 2
    # The mistake is the override's, not the file's: the message names the --set argument.
    assert ("invalid config: training_options.n_epoch (from --set training_options.n_epoch=3): unknown key; "
            "did you mean 'training_options.n_epochs'") in result.stderr
    assert "configs/digits.json" not in result.stderr
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


def imported_modules(stderr: str) -> set[str]:
    """The modules a run imported, from Python's -X importtime report on stderr."""
    return {match.group(1).strip() for match in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", stderr, re.M)}


def script(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{path} is missing: the package is installed without its entry points; rerun `make venv`"
    return str(path)


def test_installed_script_and_module_run_a_config(tmp_path):
    ckpt = ["--set", f"experiment_options.ckpt_dir={tmp_path}"]
    done = run([script("accelerated-trainer"), "--config", "configs/digits.json", *TINY, *ckpt])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run finished: reached max_steps=3" in done.stdout
    assert json.loads((tmp_path / "digits-mlp" / "last" / "state.json").read_text())["step"] == 3
    # The same run again is refused at once, before torch is imported, in one line naming the fixes.
    again = run([sys.executable, "-X", "importtime", "-m", "accelerated_trainer", "--config", "configs/digits.json", *TINY, *ckpt])
    assert again.returncode == 2
    errors = [line for line in again.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: run directory {tmp_path / 'digits-mlp'} already holds checkpoints")
    assert "experiment_options.overwrite=true" in errors[0] and "--set" in errors[0]
    assert "accelerated_trainer.checkpoint.run_dir" in imported_modules(again.stderr)
    assert "torch" not in imported_modules(again.stderr)


@pytest.mark.parametrize("command", [["accelerated-trainer"], ["-m", "accelerated_trainer"], ["train.py"]])
def test_help_imports_no_torch(command):
    if command[0] == "accelerated-trainer":
        args, env = [script("accelerated-trainer"), "--help"], {"PYTHONPROFILEIMPORTTIME": "1"}
    else:
        args, env = [sys.executable, "-X", "importtime", *command, "--help"], {}
    result = run(args, env=env)
    assert result.returncode == 0 and "--config" in result.stdout
    assert "accelerate launch -m accelerated_trainer" in result.stdout
    prog = {"accelerated-trainer": "accelerated-trainer", "-m": "python -m accelerated_trainer", "train.py": "train.py"}[command[0]]
    assert result.stdout.startswith(f"usage: {prog} ")
    modules = imported_modules(result.stderr)
    assert "argparse" in modules and not {"torch", "pydantic", "accelerate"} & modules


def test_accelerate_launch_runs_the_module(tmp_path):
    launcher = script("accelerate")
    result = run([launcher, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "-m", "accelerated_trainer", "--config", "configs/digits.json", *TINY,
                  "--set", f"experiment_options.ckpt_dir={tmp_path}"], env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run finished: reached max_steps=3" in result.stdout


def test_a_python_without_the_dependencies_is_told_how_to_set_up():
    # -S: no site-packages, as a system Python without the package's dependencies would be.
    result = run([sys.executable, "-S", str(REPO / "train.py"), "--config", "configs/digits.json"])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "No module named" in result.stderr and "make venv" in result.stderr and "pip install -e ." in result.stderr


def run_in_terminal(args, env, timeout=300) -> tuple[int, str]:
    """Run `args` with a pseudo-terminal (120 columns) as stdin, stdout and stderr; return the code and all it wrote."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, cwd=REPO, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    output = b""
    try:
        while chunk := _read(leader):
            output += chunk
        return process.wait(timeout=timeout), output.decode(errors="replace")
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()


def _read(fd) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal closed: every process writing to it has exited
        return b""


BAR = re.compile(r"^(epochs|epoch \d+):\s+\d+%\|")


def console_lines(output: str) -> list[str]:
    """What stays on the screen besides the progress bars: each line's last text, escape codes removed."""
    lines = []
    for line in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output).split("\n"):
        texts = [text for text in line.split("\r") if text.strip() and not BAR.match(text)]
        if texts:
            lines.append(texts[-1].rstrip())
    return lines


def test_the_main_job_says_little_on_a_terminal(tmp_path):
    # `make train` as a newcomer runs it: a terminal, no W&B account (offline), the default config.
    environment = {**os.environ, "HOME": str(tmp_path), "WANDB_API_KEY": ""}
    environment.pop("WANDB_MODE")
    code, output = run_in_terminal([*TRAIN, "--config", "configs/digits.json", "--set", "experiment_options.overwrite=true",
                                    "--set", f"experiment_options.ckpt_dir={tmp_path}"], environment)
    assert code == 0, output[-3000:]
    assert re.search(r"epochs: +\d+%\|", output), "the bars are drawn"
    lines = console_lines(output)
    assert len(lines) <= 15, "\n".join(lines)
    assert [line for line in lines if line.lower().startswith("wandb")] == [
        f"wandb: upload this run with `wandb sync {tmp_path / 'digits-mlp' / 'wandb'}/offline-run-*-"
        + json.loads((tmp_path / "digits-mlp" / "last" / "state.json").read_text())["run_id"] + "`"]
    assert lines[-6].startswith("run finished: early stopping")
    assert "Run summary" in (tmp_path / "digits-mlp" / "wandb.log").read_text()


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
