"""What a second thread costs the training thread: why a small asynchronous save slows the steps beside it.

    python bench/bench_save_thread.py              # 5 rounds of every variant (about a minute)
    python bench/bench_save_thread.py --quick      # smoke run

The tiny workload's hand-written loop (bench_step.py, variant a: MLP 64-128-10, batch 64, 1
thread) trains while a second thread of the same process does one of:

  idle           waits on an event: the reference
  syscalls       os.stat of one file, flat out: each call releases the GIL and takes it back
  syscalls/ms    the same, one call per millisecond (a sleep between them)
  fsyncs         writes 50 KB and fsyncs it, flat out: what a small checkpoint's save does
  cpu-no-gil     sha256 of 4 MB, flat out: work that never needs the GIL

A thread that makes a system call gives up the GIL and must take it back afterwards. When the
training thread holds it then, the other one waits, asks for it, and the training thread hands
it over at its next bytecode boundary and has to be woken again later; each hand-over costs
the training thread time. The syscalls and syscalls/ms rows give that cost per call; the
fsyncs row is what a save of the tiny trainer's checkpoint (about 80 system calls) does to
its steps; cpu-no-gil is what two busy cores cost each other with no GIL involved.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import environment, rounds, summary, table

import bench_step

VARIANTS = ["idle", "syscalls", "syscalls/ms", "fsyncs", "cpu-no-gil"]


def background(name: str, stop: threading.Event, scratch: Path, calls: list[int]) -> None:
    """The second thread's work until `stop`; counts its rounds into calls[0] (an fsyncs round is
    four system calls, open, write, fsync, close; a cpu-no-gil round one hash)."""
    target = scratch / "file"
    target.write_bytes(b"x")
    block = os.urandom(4 << 20)
    while not stop.is_set():
        if name == "idle":
            stop.wait()
        elif name == "syscalls":
            os.stat(target)
        elif name == "syscalls/ms":
            os.stat(target)
            time.sleep(0.001)
        elif name == "fsyncs":
            fd = os.open(target, os.O_WRONLY | os.O_TRUNC)
            os.write(fd, block[:50_000])
            os.fsync(fd)
            os.close(fd)
        elif name == "cpu-no-gil":
            hashlib.sha256(block).digest()
        calls[0] += 1


def measure(n_rounds: int, steps: int) -> dict[str, tuple[list[float], list[float]]]:
    """{variant: ([ms per step], [second thread's rounds per ms])}."""
    workload = bench_step.tiny_workload(steps, 30)
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in VARIANTS}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-save-thread-") as tmp:
        for _, name in rounds(VARIANTS, n_rounds):
            stop, calls = threading.Event(), [0]
            thread = threading.Thread(target=background, args=(name, stop, Path(tmp), calls), daemon=True)
            thread.start()
            time.sleep(0.05)
            began, before = time.perf_counter(), calls[0]
            model = bench_step.run_hand(workload, Path(tmp))
            elapsed, made = time.perf_counter() - began, calls[0] - before
            stop.set()
            thread.join()
            stamps = model.stamps
            results[name][0].append((stamps[workload.warmup + workload.steps] - stamps[workload.warmup]) / workload.steps * 1e3)
            results[name][1].append(made / (elapsed * 1e3))
    return results


def report(results: dict[str, tuple[list[float], list[float]]]) -> str:
    idle = summary(results["idle"][0])[0]
    rows = []
    for name in VARIANTS:
        ms, rate = results[name]
        median, low, high = summary(ms)
        per_call = ""
        if name in ("syscalls", "syscalls/ms", "fsyncs") and summary(rate)[0] > 0:  # training time lost per call
            per_call = f"{(median - idle) / (summary(rate)[0] * median) * 1e3:.0f}"
        rows.append([name, f"{median:.3f}", f"{low:.3f}-{high:.3f}", f"{median / idle:.2f}x", f"{summary(rate)[0]:.1f}", per_call])
    return table(["second thread", "ms/step median", "min-max", "vs idle", "its rounds per ms", "us of training lost per round"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per run")
    parser.add_argument("--quick", action="store_true", help="one round of 60 steps")
    args = parser.parse_args(argv)
    n_rounds, steps = (1, 60) if args.quick else (args.rounds, args.steps)
    print(environment())
    print()
    print(f"### the tiny hand-written loop beside a second thread: {steps} timed steps after 30, {n_rounds} rounds, alternated")
    print()
    print(report(measure(n_rounds, steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
