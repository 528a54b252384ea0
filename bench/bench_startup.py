"""Seconds from launch: `train.py --help`, a config error, and the first optimizer step.

    python bench/bench_startup.py                 # every variant, 5 rounds after one warm-up each
    python bench/bench_startup.py --quick         # smoke run: --help and the config error, once
    python bench/bench_startup.py --variants plain,trainer --rounds 9

Each variant is a fresh `python` process, timed from just before it is spawned. Commands that
exit (--help, the config error, the imports) are timed to their exit. Training runs are timed to
their first optimizer step: both this package (log_every_n_steps=1) and bench/plain_accelerate.py
append a `train_loss` row to metrics.jsonl right after the step, and the bench polls the file
(every 2 ms) until the row is there. Nothing in src/ is patched. Variants alternate in rounds;
the warm-up run of each (not timed) fills the OS file cache and datasets' Arrow cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import REPO, environment, rounds, summary, table

PY = sys.executable
TRAIN = ["train.py", "--config", "configs/digits.json"]


@dataclass
class Variant:
    label: str
    command: list[str]  # {out} is replaced by a fresh temporary directory
    first_step: str | None = None  # metrics.jsonl to poll, relative to {out}; None: time to exit
    exit_code: int = 0
    reference: str | None = None  # the variant this one is compared to


def _trainer(wandb_mode: str) -> list[str]:
    return [PY, *TRAIN, "--set", "experiment_options.ckpt_dir={out}", "--set", "experiment_options.overwrite=true",
            "--set", f"experiment_options.wandb.mode={wandb_mode}", "--set", "training_options.log_every_n_steps=1",
            "--set", "training_options.max_steps=1"]


VARIANTS = {
    "torch": Variant("`python -c 'import torch'` (reference)", [PY, "-c", "import torch"]),
    "imports": Variant("`python -c 'import torch, accelerate, datasets'` (reference)",
                       [PY, "-c", "import torch, accelerate, datasets"]),
    "help": Variant("`train.py --help`", [PY, "train.py", "--help"]),
    "config-error": Variant("`train.py --config configs/digits.json --set training_options.n_epoch=1` (exit 2)",
                            [PY, *TRAIN, "--set", "training_options.n_epoch=1"], exit_code=2, reference="torch"),
    "plain": Variant("first step: bench/plain_accelerate.py (reference)", [PY, "bench/plain_accelerate.py", "{out}"],
                     first_step="metrics.jsonl"),
    "trainer": Variant("first step: train.py, configs/digits.json, wandb disabled", _trainer("disabled"),
                       first_step="digits-mlp/metrics.jsonl", reference="plain"),
    "trainer-wandb": Variant("first step: train.py, configs/digits.json, wandb offline (the default without an account)",
                             _trainer("offline"), first_step="digits-mlp/metrics.jsonl", reference="plain"),
}
QUICK = ["help", "config-error"]


def run_once(variant: Variant, timeout: float = 300.0) -> float:
    """Seconds from spawn to exit, or to the first train_loss row in metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as out:
        command = [part.replace("{out}", out) for part in variant.command]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true"}
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if variant.first_step is None:
            _, stderr = proc.communicate(timeout=timeout)
            seconds = time.perf_counter() - started
        else:
            seconds = _wait_for_first_step(Path(out) / variant.first_step, proc, started, timeout)
            _, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != variant.exit_code:
            raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}, expected {variant.exit_code}:\n{stderr[-3000:]}")
        return seconds


def _wait_for_first_step(metrics: Path, proc: subprocess.Popen, started: float, timeout: float) -> float:
    while time.perf_counter() - started < timeout:
        # The file is opened (empty) before training; its first row is the first step's loss.
        if metrics.exists() and metrics.stat().st_size and "train_loss" in metrics.read_text():
            return time.perf_counter() - started
        if proc.poll() is not None and not (metrics.exists() and "train_loss" in metrics.read_text()):
            raise RuntimeError(f"{' '.join(proc.args)} exited ({proc.returncode}) before its first step:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.002)
    proc.kill()
    raise TimeoutError(f"no train_loss row in {metrics} after {timeout} s")


def report(results: dict[str, list[float]]) -> str:
    medians = {name: summary(values)[0] for name, values in results.items()}
    rows = []
    for name, values in results.items():
        variant = VARIANTS[name]
        median, low, high = summary(values)
        versus = "-"
        if variant.reference in medians and variant.reference == "torch":
            versus = f"{median - medians['torch']:+.2f} s vs import torch"
        elif variant.reference in medians:
            versus = f"{median / medians[variant.reference]:.2f}x plain accelerate"
        rows.append([variant.label, f"{median:.2f}", f"{low:.2f}-{high:.2f}", versus])
    return table(["launch to", "median s", "min-max", "vs reference"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; --quick: {', '.join(QUICK)})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="--help and the config error, once, no warm-up: a smoke run")
    args = parser.parse_args(argv)
    names = [v.strip() for v in (args.variants or ",".join(QUICK if args.quick else VARIANTS)).split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    n_rounds = 1 if args.quick else args.rounds

    bytecode = "off (PYTHONDONTWRITEBYTECODE set)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "on"
    print(f"bench_startup: {environment()}; bytecode caching {bytecode}")
    if not args.quick:
        for name in names:  # warm-up: file cache, datasets' cache of the parquet files
            run_once(VARIANTS[name])
    results: dict[str, list[float]] = {name: [] for name in names}
    for _, name in rounds(names, n_rounds):
        results[name].append(run_once(VARIANTS[name]))
    print(f"\n### startup: {n_rounds} rounds, variants alternating\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
