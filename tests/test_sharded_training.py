"""Sharded training that resumes: models sharded with torch's fully_shard, through the trainer, on CPU processes (gloo).

Every run is tests/helpers/sharded_run.py (the Python API: AcceleratedTrainer given the sharded
model) under `accelerate launch` with 2 (or 4) CPU processes, or one plain process: 12 optimizer
steps at a global batch of 64, `last` saved asynchronously every 3 steps and at each epoch end,
top-k and best weights from each evaluation. The references are the same run sharded on 2
processes without interruption, and unsharded in one process. Resumes run with pickle.load,
pickle.loads, pickle.Unpickler and torch.load made to raise. Each test kills what its launches
leave running (accelerate launch starts every worker in a session of its own).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from accelerated_trainer.checkpoint import files
from accelerated_trainer.checkpoint.store import read_weights
from conftest import REPO

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
HELPER = str(REPO / "tests" / "helpers" / "sharded_run.py")
SHARDS = ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
BATCH = {1: 64, 2: 32, 4: 16}  # per process: the same global batch of 64 on any number of processes
_ports = iter(range(29801, 29899))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def result(self) -> dict:
        return json.loads(next(line for line in self.stdout.splitlines() if line.startswith("{")))

    def weights(self, checkpoint: str = "last") -> dict[str, torch.Tensor]:
        return read_weights(self.run_dir / checkpoint)

    def report(self) -> str:
        # A worker's traceback (or faulthandler's dump) comes first, the launcher's summary last.
        return self.stdout[-2000:] + self.stderr[:3000] + "\n...\n" + self.stderr[-2000:]


def _kill_leftovers(proc: subprocess.Popen, root: Path) -> None:
    """End the launcher's session and every worker's (each in a session of its own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid_file in (root / "pids").glob("rank*.pid"):
        pid = int(pid_file.read_text())
        try:
            alive = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(root).encode() in alive:  # still our worker, not a recycled pid
            os.killpg(os.getpgid(pid), signal.SIGKILL)


def train(root: Path, *args: str, processes: int = 2, env: dict | None = None, timeout: int = 240) -> Run:
    command = [sys.executable, HELPER, str(root), "--batch-size", str(BATCH[processes]), *args]
    if processes > 1:
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(next(_ports)), *command[1:]]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    proc = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _kill_leftovers(proc, root)
    return Run(proc.returncode, stdout, stderr, root / "sharded")


def resume_copy(run: Path, tmp_path: Path, name: str) -> Path:
    """A copy of a run's root to resume in (a resume writes new checkpoints there)."""
    shutil.copytree(run.parent, tmp_path / name, ignore=shutil.ignore_patterns("pids"))
    return tmp_path / name


def step_of(checkpoint: Path) -> int:
    return files.read_json(checkpoint / "state.json")["step"]


def assert_bit_exact(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def assert_fp32_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharded-training")


@pytest.fixture(scope="module")
def unsharded(root) -> Run:
    run = train(root / "unsharded", processes=1)
    assert run.returncode == 0, run.report()
    assert run.result == {"steps": 12, "sharded": False, "processes": 1, "unpickling": "allowed", "best": str(run.run_dir / "best")}
    return run


@pytest.fixture(scope="module")
def sharded(root) -> Run:
    run = train(root / "sharded")
    assert run.returncode == 0, run.report()
    assert run.result["sharded"] and run.result["steps"] == 12
    return run


@pytest.fixture(scope="module")
def killed_mid_write(root) -> Path:
    """Process 1 SIGKILLed itself halfway through its shard file in the third save of `last`.
    DCP waits 0.3 s before it writes: training runs ahead of each asynchronous save, so what the
    files hold is the snapshot taken when the save was asked for, or the resume is not exact."""
    run = train(root / "killed", env={"CRASH_AT": "write:3", "SLOW_WRITES": "0.3"})
    assert run.returncode != 0 and "Signal 9 (SIGKILL) received" in run.stderr, run.report()
    return run.run_dir


def test_two_sharded_processes_train_as_one_unsharded(unsharded, sharded):
    assert_fp32_close(sharded.weights(), unsharded.weights())
    # best/ and top/* are one consolidated model.safetensors; here best is the final step's.
    assert (sharded.run_dir / "best" / "model.safetensors").is_file()
    assert_bit_exact(sharded.weights("best"), sharded.weights())
    assert [entry["step"] for entry in files.read_json(sharded.run_dir / "checkpoints.json")["top_k"]] == [12, 8]


def test_a_sharded_checkpoint_is_safetensors_and_json_sealed_by_one_manifest(sharded):
    last = sharded.run_dir / "last"
    names = sorted(path.name for path in last.iterdir())
    assert names == sorted([*SHARDS, "manifest.json", "optimizer.json", "rng-rank0.json", "rng-rank1.json", "sharded.json", "state.json"])
    assert sorted(files.read_json(last / "manifest.json")["files"]) == sorted(set(names) - {"manifest.json"})
    assert files.read_json(last / "sharded.json") == {"format": "dcp-safetensors", "world_size": 2, "shards": SHARDS}
    for shard in SHARDS:  # each process's own pieces of the model and of the optimizer state
        with safe_open(str(last / shard), framework="pt") as handle:
            assert any(key.startswith("model.") for key in handle.keys())
            assert any(key.startswith("optimizer.state.") for key in handle.keys())
    for slot in ("last", "previous", "older"):
        assert files.verify(sharded.run_dir / slot) is None
    for path in sharded.run_dir.rglob("*"):
        if path.is_file() and path.name != ".lock.json" and "pids" not in path.parts:
            assert path.suffix in (".json", ".jsonl", ".safetensors"), path
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle or a torch.save zip"


def test_sigkill_mid_write_leaves_the_earlier_checkpoints_whole(killed_mid_write):
    assert [files.verify(killed_mid_write / slot) for slot in ("last", "previous")] == [None, None]
    assert step_of(killed_mid_write / "previous") < step_of(killed_mid_write / "last") < 12
    assert files.verify(killed_mid_write / ".last.tmp") is not None  # the save cut short never passes for a checkpoint


def test_resume_on_two_processes_is_bit_exact(killed_mid_write, sharded, tmp_path):
    saved = files.read_json(killed_mid_write / "last" / "state.json")
    epoch, step = saved["epoch"], saved["step"]
    run = train(resume_copy(killed_mid_write, tmp_path, "resume2"), "--resume", env={"FORBID_UNPICKLING": "1"})
    assert run.returncode == 0, run.report()
    assert run.result["unpickling"] == "forbidden" and run.result["sharded"]
    assert f"resume: continuing from {run.run_dir / 'last'} at epoch {epoch}, step {step}." in run.stdout
    assert_bit_exact(run.weights(), sharded.weights())


def test_resume_on_one_process_matches_the_unsharded_run(killed_mid_write, unsharded, tmp_path):
    run = train(resume_copy(killed_mid_write, tmp_path, "resume1"), "--resume", processes=1, env={"FORBID_UNPICKLING": "1"})
    assert run.returncode == 0, run.report()
    assert run.result["unpickling"] == "forbidden" and not run.result["sharded"]
    assert "the checkpoint was written by 2 processes, this run has 1" in run.stdout
    assert_fp32_close(run.weights(), unsharded.weights())


def test_resume_on_four_processes_reshards_every_tensor(killed_mid_write, sharded, tmp_path):
    # 33 rows shard 9/8/8/8 on 4 processes; the last layer's 3 rows leave one of them an empty shard.
    run = train(resume_copy(killed_mid_write, tmp_path, "resume4"), "--resume", processes=4, env={"FORBID_UNPICKLING": "1"})
    assert run.returncode == 0, run.report()
    assert files.read_json(run.run_dir / "last" / "sharded.json")["world_size"] == 4
    assert_fp32_close(run.weights(), sharded.weights())


def test_a_one_process_checkpoint_resumes_on_two(unsharded, sharded, tmp_path):
    (tmp_path / "grow").mkdir()
    shutil.copytree(unsharded.run_dir / "older", tmp_path / "grow" / "from-one")  # a full checkpoint, model.safetensors
    run = train(tmp_path / "grow", "--resume-from", str(tmp_path / "grow" / "from-one"), env={"FORBID_UNPICKLING": "1"})
    assert run.returncode == 0, run.report()
    assert "the checkpoint was written by 1 processes, this run has 2" in run.stdout
    assert_fp32_close(run.weights(), sharded.weights())


def test_sigkill_before_the_manifest_then_resume_synchronous_saves(root, sharded, tmp_path):
    run = train(root / "killed-at-seal", "--sync", env={"CRASH_AT": "seal:3"})
    assert run.returncode != 0, run.report()
    # Every shard of the third save was written; without its manifest it never passes for a checkpoint.
    assert sorted(path.name for path in (run.run_dir / ".last.tmp").glob("*.safetensors")) == SHARDS
    assert "no manifest.json" in files.verify(run.run_dir / ".last.tmp")
    assert files.verify(run.run_dir / "last") is None and step_of(run.run_dir / "last") == 4
    resumed = train(root / "killed-at-seal", "--sync", "--resume", env={"FORBID_UNPICKLING": "1"})
    assert resumed.returncode == 0, resumed.report()
    assert_bit_exact(resumed.weights(), sharded.weights())


def test_a_corrupted_shard_is_detected_and_the_resume_falls_back_to_previous(killed_mid_write, sharded, tmp_path):
    run_dir = resume_copy(killed_mid_write, tmp_path, "corrupted") / "sharded"
    shard = run_dir / "last" / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of a tensor's bytes: the file still parses, only the checksum tells
    shard.write_bytes(bytes(data))
    previous = files.read_json(run_dir / "previous" / "state.json")
    run = train(run_dir.parent, "--resume", env={"FORBID_UNPICKLING": "1"})
    assert run.returncode == 0, run.report()
    assert f"resume: passing over a checkpoint: {shard} does not match its crc32 in the manifest (corrupted)" in run.stdout
    assert (f"resume: continuing from {run_dir / 'previous'} at epoch {previous['epoch']}, step {previous['step']}."
            in run.stdout)
    assert_bit_exact(run.weights(), sharded.weights())
    assert all(files.verify(run_dir / slot) is None for slot in ("last", "previous", "older"))  # the damaged slot was rewritten
