"""The bench scripts still run: each one with --quick, as a subprocess.

Only that they finish and print their table; the timings themselves belong in bench/, not in
tests. They run side by side to keep this file short (they are mostly imports); bench_ddp.py,
whose launches each start 2 processes, and the fault campaign run on their own.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEADERS = {  # what each one's output must hold
    "bench_step.py": ("| variant | ms/step median | min-max | vs (a) |", "### tiny:", "### compute:", "### small-epochs:"),
    "bench_startup.py": ("| launch to | median s | min-max | vs reference |",),
    "bench_checkpoint.py": ("| save | MB on disk | median s | min-max | MB/s | vs raw |",),
    "bench_async_save.py": ("| variant | steps | n | median ms | vs none | mean ms | mean vs none |",),
    "bench_save_thread.py": ("| second thread | ms/step median | min-max | vs idle |", "| fsyncs |"),
}


@pytest.fixture(scope="module")
def quick_runs():
    procs = {
        script: subprocess.Popen([sys.executable, str(REPO / "bench" / script), "--quick"], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for script in HEADERS
    }
    results = {}
    try:
        for script, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=180)
            results[script] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.parametrize("script", list(HEADERS))
def test_bench_quick_prints_its_table(quick_runs, script):
    returncode, stdout, stderr = quick_runs[script]
    assert returncode == 0, stderr[-3000:]
    for expected in HEADERS[script]:
        assert expected in stdout, stdout[-3000:]


def test_bench_ddp_quick_run_reports_both_workloads(tmp_path):
    """Alone, not beside the others: each of its launches starts 2 processes on the 2 cores."""
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_ddp.py"), "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| variant | ms/step median | min-max | vs plain accelerate |") == 2, done.stdout[-3000:]
    figures = json.loads(out.read_text())
    assert sorted(figures) == ["compute", "tiny"]
    for variants in figures.values():
        assert sorted(variants) == ["plain", "trainer"]
        assert all(value > 0 for figure in variants.values() for values in figure.values() for value in values), variants


def test_fault_campaign_quick_run_loses_nothing(tmp_path):
    """One random SIGKILL of a 1-process and one of a 2-process run, each resumed: whatever the
    moment, nothing lost or corrupt and the final weights are the uninterrupted run's."""
    out = tmp_path / "outcomes.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "fault_campaign.py"), "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| processes | trials | killed mid-save | lost | corrupt | bit-exact |" in done.stdout
    outcomes = json.loads(out.read_text())
    assert sorted(outcomes) == ["1", "2"]
    for trials in outcomes.values():
        assert all(not t["lost"] and not t["corrupt"] and t["bit-exact"] for t in trials), trials


def test_bench_sharded_save_quick_run_prints_its_table():
    """Alone, not beside the others: it starts 2 processes on the 2 cores."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_sharded_save.py"), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| variant | MB on disk | blocking ms median | min-max | durable s median | min-max | vs dcp.save |" in done.stdout
    for variant in ("dcp.save, default FileSystemWriter", "accelerated_trainer sharded last (safetensors", "sharded last, async_save"):
        assert variant in done.stdout, done.stdout[-3000:]
