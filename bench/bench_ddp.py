"""Milliseconds per step with 2 processes: the trainer against a plain accelerate DDP loop.

    python bench/bench_ddp.py                     # both workloads, 4 launches of each variant
    python bench/bench_ddp.py --quick             # smoke run: a few steps, one launch each
    python bench/bench_ddp.py --workload tiny --repetitions 8

Each launch is `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2
--num_machines 1 --mixed_precision no --dynamo_backend no` (gloo on the CPU, 1 thread per
process: OMP_NUM_THREADS=1) of the same job, written two ways:
  plain     bench/plain_accelerate_ddp.py: datasets, DataLoader, prepare, accelerator.backward
  trainer   train.py --config (written by this bench): validation off (validation_split 0),
            trackers off, everything else the config's defaults, so an asynchronous `last` save
            at each epoch end, metrics.jsonl every 10 steps, the progress bar on
Both use AdamW(lr 1e-3, weight decay 0.01, fused where torch has it on the CPU) and the MLP of
stamped.py, whose forward records the clock; rank 0 writes its stamps to a file. ms/step is
(stamp[warmup + steps] - stamp[warmup]) / steps: steady state, forward to forward, with the
launch, the set-up, the first epoch end and the run's end left out, and the later epoch ends
(the trainer's saves, each loader's new epoch) in. CPU time is rank 0's whole process.

Workloads, each over several epochs:
  tiny      MLP 64-128-10 on all 1,797 digits rows (the shipped train and validation files
            together), 32 rows per process (global batch 64), 29 steps per epoch
  compute   MLP 784-1024-1024-10 on random data (seeded, written once per run to a parquet
            file), 256 rows per process (global 512: each process does bench_step.py's compute
            step, on one of the 2 cores), 20 steps per epoch
The variants alternate launch by launch (the order rotating each repetition), so a slow phase
of the shared machine hits both alike; the report gives medians, min-max and trainer / plain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import REPO, environment, rounds, summary, table

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
PROCESSES = 2
VARIANTS = {
    "plain": "plain accelerate DDP loop (bench/plain_accelerate_ddp.py)",
    "trainer": "AcceleratedTrainer (train.py --config)",
}
DIGITS = [REPO / "data" / "digits" / "train.parquet", REPO / "data" / "digits" / "validation.parquet"]


@dataclass
class Workload:
    name: str
    description: str
    dims: list[int]
    files: list[Path]
    feature_column: str
    rows: int
    batch_size: int  # per process
    warmup: int
    steps: int

    @property
    def total_steps(self) -> int:
        # One more than warmup + steps: the window ends at the forward of the step after it.
        return self.warmup + self.steps + 1

    @property
    def steps_per_epoch(self) -> int:
        # accelerate's sharded batches: every process gets as many (the last ones padded).
        return math.ceil(math.ceil(self.rows / self.batch_size) / PROCESSES)


def tiny_workload(steps: int, warmup: int) -> Workload:
    return Workload("tiny", "MLP 64-128-10 on digits (1,797 rows: train + validation files), batch 32 per process "
                    f"(global {32 * PROCESSES})", [64, 128, 10], DIGITS, "pixels", 1797, 32, warmup, steps)


def compute_workload(steps: int, warmup: int, steps_per_epoch: int, into: Path) -> Workload:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = steps_per_epoch * 256 * PROCESSES
    generator = np.random.default_rng(0)
    features = generator.standard_normal((rows, 784), dtype=np.float32)
    labels = generator.integers(0, 10, rows, dtype=np.int64)
    path = into / "random.parquet"
    pq.write_table(pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), 784),
                             "label": pa.array(labels)}), path)
    return Workload("compute", f"MLP 784-1024-1024-10 on random data ({rows} rows), batch 256 per process "
                    f"(global {256 * PROCESSES})", [784, 1024, 1024, 10], [path], "features", rows, 256, warmup, steps)


# ---------------------------------------------------------------- the two jobs


def job(variant: str, w: Workload, run: Path) -> list[str]:
    """The command after `accelerate launch ...`: the plain script's or train.py's arguments."""
    stamps = run / "stamps.json"
    cpu_at = [w.warmup, w.warmup + w.steps]
    if variant == "plain":
        return ["bench/plain_accelerate_ddp.py", "--data", *map(str, w.files), "--features", w.feature_column,
                "--dims", ",".join(map(str, w.dims)), "--batch-size", str(w.batch_size), "--steps", str(w.total_steps),
                "--cpu-at", ",".join(map(str, cpu_at)), "--stamps", str(stamps)]
    config = {
        "dataset_options": {"data_files": {"train": [str(f) for f in w.files]}, "feature_columns": [w.feature_column],
                            "label_column": "label", "batch_size": w.batch_size, "validation_split": 0},
        "model_options": {"name": "stamped:LaunchedMLP",
                          "kwargs": {"dims": w.dims, "total": w.total_steps, "stamps_to": str(stamps), "cpu_at": cpu_at}},
        # One epoch more than needed: max_steps ends the run, after the window's last forward.
        "training_options": {"n_epochs": math.ceil(w.total_steps / w.steps_per_epoch) + 1, "max_steps": w.total_steps,
                             "optimizer": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.01}},
        "experiment_options": {"title": "trainer", "ckpt_dir": str(run / "runs"), "overwrite": True, "trackers": []},
    }
    (run / "config.json").write_text(json.dumps(config, indent=1))
    return ["train.py", "--config", str(run / "config.json")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(variant: str, w: Workload, root: Path, cache: Path, timeout: float) -> tuple[float, float]:
    """(wall ms/step, CPU ms/step) of one launch, from rank 0's stamps."""
    from fault_campaign import kill_job

    with tempfile.TemporaryDirectory(prefix=f"{variant}-", dir=root) as tmp:
        run = Path(tmp)
        command = [ACCELERATE, "launch", *LAUNCH, "--main_process_port", str(free_port()), *job(variant, w, run)]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache),
               # stamped.py for both jobs; the package of PYTHONPATH (compare_commits.py's) stays ahead of the installed one.
               "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with open(run / "output.log", "w") as log:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_job(process)
                raise RuntimeError(f"{variant} on {w.name}: no exit after {timeout} s:\n{tail(run)}") from None
        stamps = run / "stamps.json"
        if not stamps.is_file():
            raise RuntimeError(f"{variant} on {w.name} exited with {returncode} before its step {w.total_steps} "
                               f"(no {stamps.name}):\n{tail(run)}")
        if returncode != 0:
            print(f"warning: {variant} on {w.name} exited with {returncode} after its last step; its figure is kept:\n"
                  f"{tail(run, 1500)}", file=sys.stderr)
        recorded = json.loads(stamps.read_text())
    wall, cpu = recorded["wall"], recorded["cpu"]
    start, end = w.warmup, w.warmup + w.steps
    return (wall[end] - wall[start]) / w.steps * 1e3, (cpu[str(end)] - cpu[str(start)]) / w.steps * 1e3


def tail(run: Path, chars: int = 4000) -> str:
    return (run / "output.log").read_text(errors="replace")[-chars:]


# ---------------------------------------------------------------- measuring and reporting


def measure(w: Workload, repetitions: int, root: Path, cache: Path, timeout: float) -> dict[str, tuple[list[float], list[float]]]:
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in VARIANTS}
    for r, name in rounds(list(VARIANTS), repetitions):
        print(f"{w.name}: launch {r + 1}/{repetitions} of {name}", file=sys.stderr, flush=True)
        wall, cpu = launch(name, w, root, cache, timeout)
        results[name][0].append(wall)
        results[name][1].append(cpu)
    return results


def report(w: Workload, results: dict[str, tuple[list[float], list[float]]]) -> str:
    base = [summary(results["plain"][clock])[0] for clock in (0, 1)]
    rows = []
    for name, (wall, cpu) in results.items():
        median, low, high = summary(wall)
        cpu_median, cpu_low, cpu_high = summary(cpu)
        rows.append([VARIANTS[name], f"{median:.3f}", f"{low:.3f}-{high:.3f}", f"{median / base[0]:.2f}x",
                     f"{cpu_median:.3f}", f"{cpu_low:.3f}-{cpu_high:.3f}", f"{cpu_median / base[1]:.2f}x"])
    head = (f"### {w.name}, {PROCESSES} processes (gloo, 1 thread each): {w.description}, {w.steps_per_epoch} steps per "
            f"epoch; {w.steps} timed steps after {w.warmup} (about {w.steps / w.steps_per_epoch:.0f} epoch ends in the "
            f"window), {len(results['plain'][0])} launches of each, alternated")
    header = ["variant", "ms/step median", "min-max", "vs plain accelerate", "CPU ms/step (rank 0)", "CPU min-max",
              "CPU vs plain"]
    return head + "\n\n" + table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["tiny", "compute", "both"], default="both")
    parser.add_argument("--repetitions", type=int, default=4, help="launches of each variant per workload")
    parser.add_argument("--tiny-steps", type=int, default=870, help="timed steps (29 per epoch)")
    parser.add_argument("--tiny-warmup", type=int, default=30, help="steps before the window (past the first epoch end)")
    parser.add_argument("--compute-steps", type=int, default=100)
    parser.add_argument("--compute-warmup", type=int, default=21)
    parser.add_argument("--compute-steps-per-epoch", type=int, default=20, help="sets the random data's rows")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one launch may take")
    parser.add_argument("--quick", action="store_true", help="a few steps, one launch each: a smoke run, not a measurement")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the raw ms/step figures here (bench/compare_commits.py reads them)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.tiny_steps, args.tiny_warmup = 1, 30, 3
        args.compute_steps, args.compute_warmup, args.compute_steps_per_epoch = 3, 1, 2

    print(f"bench_ddp: {environment()}")
    raw = {}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        root = Path(tmp)
        workloads = []
        if args.workload in ("tiny", "both"):
            workloads.append(tiny_workload(args.tiny_steps, args.tiny_warmup))
        if args.workload in ("compute", "both"):
            workloads.append(compute_workload(args.compute_steps, args.compute_warmup, args.compute_steps_per_epoch, root))
        for w in workloads:
            results = measure(w, args.repetitions, root, root / "datasets-cache", args.timeout)
            raw[w.name] = {name: {"wall ms/step": wall, "CPU ms/step": cpu} for name, (wall, cpu) in results.items()}
            print()
            print(report(w, results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
