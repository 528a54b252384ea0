"""preflight.check with real processes (gloo on localhost), each standing for a node of its own."""

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

PROBE = str(REPO / "tests" / "helpers" / "preflight_probe.py")


def start(rank, port, run_dir, node, timeout_s=60, **extra):
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "SLURMD_NODENAME": node, "RUN_DIR": str(run_dir), "PREFLIGHT_TIMEOUT_S": str(timeout_s), **extra}
    return subprocess.Popen([sys.executable, PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*processes):
    return [(p.returncode, out + err) for p in processes for out, err in [p.communicate(timeout=120)]]


def test_one_shared_directory_passes_and_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "runs" / "title"
    results = finish(start(0, 29731, run_dir, "node-a"), start(1, 29731, run_dir, "node-b"))
    assert [code for code, _ in results] == [0, 0], results
    assert all("preflight passed" in output for _, output in results)
    # ckpt_dir was created for the check; the run directory is left to the trainer, no token remains.
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_node_with_another_run_directory_is_named_on_every_process(tmp_path):
    results = finish(start(0, 29733, tmp_path / "a" / "title", "node-a"), start(1, 29733, tmp_path / "b" / "title", "node-b"))
    assert [code for code, _ in results] == [2, 2], results
    for _, output in results:
        assert f"node node-b resolves the run directory to {tmp_path / 'b' / 'title'}" in output
        assert f"rank 0 on node node-a to {tmp_path / 'a' / 'title'}" in output
        assert "experiment_options.ckpt_dir" in output


def test_a_run_directory_rank_0_cannot_create_is_named(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    run_dir = tmp_path / "file" / "runs" / "title"
    results = finish(start(0, 29735, run_dir, "node-a"), start(1, 29735, run_dir, "node-b"))
    assert [code for code, _ in results] == [2, 2], results
    assert all(f"node node-a (rank 0) cannot write into {run_dir.parent}" in output for _, output in results)


@pytest.mark.parametrize("other, stage", [
    ("absent", "forming the process group"),          # the other node never starts
    ("join-and-hang", "waiting in its first all-reduce"),  # it joins, then hangs
])
def test_a_process_left_waiting_names_its_node_and_exits_3_at_the_timeout(tmp_path, other, stage):
    port = 29737 if other == "absent" else 29739
    began = time.monotonic()
    waiting = start(0, port, tmp_path / "title", "node-a", timeout_s=3)
    hanging = start(1, port, tmp_path / "title", "node-b", PROBE="join-and-hang") if other != "absent" else None
    [(code, output)] = finish(waiting)
    if hanging is not None:
        hanging.kill()
        hanging.communicate()
    assert code == 3, output
    assert f"preflight: node node-a (rank 0 of 2) was still {stage} after 3 s" in output
    assert "experiment_options.preflight_timeout_s" in output
    assert time.monotonic() - began < 30
