"""No single fault loses the last good state: the fault paths of issue #16, each as a user's run meets it.

Runs go through the command line in their own process session, as a scheduler or a terminal
would start them; signals go to the whole process tree (wandb's service included), as
schedulers send them.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from accelerated_trainer import AcceleratedTrainer

from conftest import REPO, digits_config
from fault_helpers import snapshot
from helpers.processes import process_tree, signal_tree

CRASH_RUN = str(REPO / "tests" / "helpers" / "crash_run.py")
THEN_WAIT = str(REPO / "tests" / "helpers" / "cli_then_wait.py")
BASE = ["training_options.early_stopping=null", "experiment_options.wandb.mode=disabled",
        "experiment_options.progress_bar=false"]


def command(script, run_root, *settings):
    args = [sys.executable, script, "--config", "configs/digits.json", "--set", f"experiment_options.ckpt_dir={run_root}"]
    return args + [a for setting in [*BASE, *settings] for a in ("--set", setting)]


def environment(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}


def run(script, run_root, *settings, **env):
    return subprocess.run(command(script, run_root, *settings), cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=environment(**env))


def start(script, run_root, *settings, **env):
    return subprocess.Popen(command(script, run_root, *settings), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environment(**env), start_new_session=True)


def wait_for_rows(run_dir: Path, rows: int, process, timeout=120):
    """Until metrics.jsonl holds `rows` lines: training is under way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= rows:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir} did not start training")


def step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "state.json").read_text())["step"]


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def weights(run_root: Path):
    return load_file(str(run_root / "digits-mlp" / "last" / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# ---------------------------------------------------------------- 1. a fallback, then a crash


def test_a_crash_in_the_first_save_after_a_fallback_keeps_the_state_resumed_from(tmp_path):
    straight = run("train.py", tmp_path / "straight", "training_options.n_epochs=3")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run(CRASH_RUN, tmp_path / "cut", "training_options.n_epochs=3", "experiment_options.async_save=false",
                CRASH_AT="step:50")  # killed in epoch 2
    assert first.returncode == -9, first.stderr[-3000:]
    run_dir = tmp_path / "cut" / "digits-mlp"
    assert (step_of(run_dir / "last"), step_of(run_dir / "previous")) == (46, 23)
    flip_byte(run_dir / "last" / "optimizer.safetensors")  # `last` (step 46) is damaged: resume falls back

    crashed = run(CRASH_RUN, tmp_path / "cut", "training_options.n_epochs=3", "experiment_options.resume=true",
                  CRASH_AT="seal:1")  # killed while writing its first `last`, files written, no manifest yet
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert f"continuing from {run_dir / 'previous'}" in crashed.stdout

    resumed = run("train.py", tmp_path / "cut", "training_options.n_epochs=3", "experiment_options.resume=true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "starting a fresh run" not in resumed.stdout
    assert "at epoch 1, step 23" in resumed.stdout, "the state the fallback resumed from is still there"
    assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "straight"))


def test_a_crash_between_the_renames_of_a_save_is_completed_on_resume(tmp_path):
    crashed = run(CRASH_RUN, tmp_path, "training_options.n_epochs=3", CRASH_AT="publish:2")
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    run_dir = tmp_path / "digits-mlp"
    assert not (run_dir / "last").exists() and step_of(run_dir / ".last.tmp") == 46

    resumed = run("train.py", tmp_path, "training_options.n_epochs=3", "experiment_options.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "completed the save of step 46" in resumed.stdout
    assert f"continuing from {run_dir / 'last'} at epoch 2, step 46" in resumed.stdout
    assert not (run_dir / ".last.tmp").exists()


# ---------------------------------------------------------------- 2. nothing valid to resume


def test_a_resume_that_finds_nothing_valid_refuses_and_changes_nothing(tmp_path):
    done = run("train.py", tmp_path, "training_options.n_epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "digits-mlp"
    model = run_dir / "last" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    flip_byte(run_dir / "previous" / "optimizer.safetensors")
    before = snapshot(run_dir)

    resumed = run("train.py", tmp_path, "training_options.n_epochs=3", "experiment_options.resume=true")
    assert resumed.returncode == 2, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    error = resumed.stderr.strip().splitlines()[-1]
    assert "last/model.safetensors" in error and "previous/optimizer.safetensors" in error
    assert "overwrite" in error and "Nothing was changed" in error
    assert snapshot(run_dir) == before, "a refused resume changes nothing: best/, top/ and the damaged ones stay"


# ---------------------------------------------------------------- 3. on_save_error: continue


def test_continue_never_reports_success_when_the_final_state_was_not_saved(tmp_path, monkeypatch, capsys):
    from accelerated_trainer import cli
    from accelerated_trainer.checkpoint import tensors

    real = tensors.write_tensors

    def full_disk(path, *args, **kwargs):
        if path.parent.name == ".last.tmp":
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tensors, "write_tensors", full_disk)
    config = digits_config(tmp_path, training_options={"n_epochs": 2}, experiment_options={"on_save_error": "continue"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code = cli.main(["--config", str(path)])
    out = capsys.readouterr().out
    assert code == cli.NOT_SAVED_EXIT_CODE == 5
    assert out.strip().splitlines()[-1].startswith("error: the final state (step 46) was not saved")
    assert "last checkpoint NOT SAVED" in out
    run_dir = tmp_path / "digits-mlp"
    assert not (run_dir / "last").exists() and not list(run_dir.glob(".*tmp*")), "nothing half-written is left"


# ---------------------------------------------------------------- 4. two runs, one directory


def test_a_second_run_in_a_live_runs_directory_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    first = start("train.py", tmp_path, "training_options.n_epochs=1000")
    try:
        wait_for_rows(tmp_path / "digits-mlp", 5, first)
        for resume in ("false", "true"):
            second = run("train.py", tmp_path, "training_options.n_epochs=1000", f"experiment_options.resume={resume}",
                         "experiment_options.overwrite=true")
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            assert f"pid {first.pid}" in second.stderr and "still going" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    resumed = run("train.py", tmp_path, "training_options.n_epochs=2", "experiment_options.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took over the lock of a run that ended without releasing it (host" in resumed.stdout
    assert f"pid {first.pid}" in resumed.stdout


# ---------------------------------------------------------------- 5. Ctrl-C


def test_the_first_ctrl_c_stops_like_a_preemption_and_says_how_to_resume(tmp_path):
    process = start("train.py", tmp_path, "training_options.n_epochs=1000")
    wait_for_rows(tmp_path / "digits-mlp", 12, process)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "run finished: interrupted by Ctrl-C (SIGINT)" in out and "Traceback" not in err
    assert "--set experiment_options.resume=true" in out
    steps = int(out.split("epochs / steps")[1].split("/")[1].split()[0])
    assert step_of(tmp_path / "digits-mlp" / "last") == steps, "the step it stopped at is saved"


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    process = start("train.py", tmp_path, "training_options.n_epochs=1000")
    wait_for_rows(tmp_path / "digits-mlp", 12, process)
    os.killpg(process.pid, signal.SIGINT)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]


# ---------------------------------------------------------------- 6. preemption with the default tracker


def test_sigterm_to_the_whole_process_tree_with_wandb_still_saves_and_exits_99(tmp_path):
    process = start("train.py", tmp_path, "training_options.n_epochs=1000", "experiment_options.wandb.mode=offline")
    wait_for_rows(tmp_path / "digits-mlp", 25, process)
    members = process_tree(process.pid)
    signal_tree(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert len(members) > 1, "wandb's service runs beside the trainer"
    assert process.returncode == 99, out[-2000:] + err[-3000:]
    assert "run finished: preempted by SIGTERM" in out and "Traceback" not in err
    steps = int(out.split("epochs / steps")[1].split("/")[1].split()[0])
    assert step_of(tmp_path / "digits-mlp" / "last") == steps


# ---------------------------------------------------------------- 7. the smaller edges


def test_when_last_and_previous_hold_the_same_step_resume_takes_last(tmp_path):
    done = run("train.py", tmp_path, "training_options.n_epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "digits-mlp"
    shutil.copytree(run_dir / "last", run_dir / "previous")
    resumed = run("train.py", tmp_path, "training_options.n_epochs=2", "experiment_options.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing from {run_dir / 'last'} at epoch 1, step 23" in resumed.stdout


def caught_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def test_sigterm_during_the_set_up_is_honoured_once_training_starts(tmp_path):
    process = start("train.py", tmp_path, "training_options.n_epochs=1000")
    deadline = time.monotonic() + 60
    while not caught_signals(process.pid) & (1 << (signal.SIGTERM - 1)):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text(), "SIGTERM is caught before torch is loaded"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 99, err[-3000:]
    assert "preempted by SIGTERM" in out
    assert step_of(tmp_path / "digits-mlp" / "last") == 1


def test_sigterm_after_training_ended_does_not_kill_the_process(tmp_path):
    process = start(THEN_WAIT, tmp_path, "training_options.n_epochs=1")
    for line in process.stdout:
        if line.startswith("the command line returned"):
            break
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-3000:]


class NaNWhenEvaluated(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)

    def forward(self, features):
        out = self.net(features)
        return out if self.training else out * float("nan")


def strict(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_checkpoint_index_and_metadata_stay_valid_json_with_nan_metrics(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 2, "monitor": "val_loss"})
    AcceleratedTrainer(NaNWhenEvaluated(), config).train()
    run_dir = tmp_path / "digits-mlp"
    index = strict((run_dir / "checkpoints.json").read_text())
    assert index["top_k"] and all(entry["value"] == "nan" for entry in index["top_k"])
    for meta in run_dir.glob("top/*/meta.json"):
        strict(meta.read_text())
    strict((run_dir / "last" / "state.json").read_text())
