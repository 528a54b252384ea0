"""Training step time while `last` checkpoints are written: asynchronous, synchronous, and no saves.

    python bench/bench_async_save.py              # 21M parameters (254 MB with AdamW state), 5 rounds
    python bench/bench_async_save.py --quick      # smoke run: a small model, one round

The trainer trains an MLP (64 -> 2048 x 6 -> 10, 21.1M parameters; 254 MB of weights and AdamW
state) on random data, batch 32, one torch thread, saving `last` every --every steps:
  none     save_every_n_steps off: the reference step time
  async    experiment_options.async_save true (the default)
  sync     experiment_options.async_save false: the save runs on the training thread

A step is timed forward to forward (bench_step.py's MLP stamps its forward). A step "during a
save" is one whose interval overlaps a save, from the call of save_last until checkpoints.json
lists the new `last`; for sync that is the step that saves. Only saves started inside the timed
window count; the untimed warm-up holds a run's first three saves, which write new files (from
the fourth on, a save writes over the files of `older`: the steady state). Reported: the
median and the mean of those steps, and of all steps, against the `none` runs' steps, and the
median against the steps outside a save of the same runs (on a shared VM the machine's speed
drifts from run to run; neighbouring steps share it). All variants alternate in rounds within
one process, after --warmup-rounds untimed rounds (a fresh VM backs memory lazily: the first
writes into page cache it never touched run several times slower, which a long run pays once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_step import MLP
from common import environment, rounds, silenced, table

VARIANTS = {"none": "no checkpoint in the window", "async": "async_save true (default)", "sync": "async_save false"}


def instrument() -> list[tuple[float, float]]:
    """Save windows (call of save_last, checkpoints.json rewritten), in order."""
    try:
        from accelerated_trainer.checkpoint import files
    except ImportError:  # a commit before the checkpoint package (bench/compare_commits.py)
        from accelerated_trainer import storage as files
    from accelerated_trainer.checkpoint import Checkpointer

    windows: list[list[float]] = []
    save_last, atomic_write_json = Checkpointer.save_last, files.atomic_write_json

    def timed_save_last(self, *args, **kwargs):
        windows.append([time.perf_counter(), float("nan")])
        return save_last(self, *args, **kwargs)

    def timed_index(path, data):
        atomic_write_json(path, data)
        if path.name == "checkpoints.json" and windows and windows[-1][1] != windows[-1][1]:
            windows[-1][1] = time.perf_counter()

    Checkpointer.save_last, files.atomic_write_json = timed_save_last, timed_index
    return windows


def run(variant: str, args, data, tmp: Path, windows: list) -> tuple[list[float], list[bool]]:
    """Step durations (s) in the timed window, and whether each overlaps a save."""
    from accelerated_trainer import AcceleratedTrainer

    torch.manual_seed(0)
    model = MLP([64, *[args.width] * args.layers, 10])
    total = args.warmup + args.steps + 1
    config = {
        "dataset_options": {"feature_columns": ["features"], "label_column": "label", "batch_size": args.batch_size,
                            "validation_split": 0},
        "training_options": {"n_epochs": 1, "max_steps": total, "log_every_n_steps": 10,
                             "save_every_n_steps": None if variant == "none" else args.every,
                             "optimizer": {"name": "AdamW", "lr": 1e-4}},
        "experiment_options": {"title": variant, "ckpt_dir": str(tmp), "overwrite": True, "progress_bar": True,
                               "wandb": {"mode": "disabled"}, "async_save": variant != "sync"},
    }
    windows.clear()
    with silenced():
        AcceleratedTrainer(model, config, train_dataset=data).train()
    stamps = model.stamps[args.warmup:args.warmup + args.steps + 1]
    inside = [(start, end) for start, end in windows if stamps[0] <= start < stamps[-1]]
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    during = [any(a < end and start < b for start, end in inside) for a, b in zip(stamps, stamps[1:])]
    return durations, during


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-rounds", type=int, default=1,
                        help="untimed rounds first: on a fresh VM the first writes into never-touched memory are slow")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 3 x --every + 3, so three saves fall in it)")
    parser.add_argument("--every", type=int, default=15, help="save_every_n_steps")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a small model, one round: a smoke run")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the raw step times here (bench/compare_commits.py reads them)")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 3 * args.every + 3
    if args.quick:
        args.rounds, args.warmup_rounds, args.steps, args.warmup, args.every, args.width, args.layers = 1, 0, 12, 2, 4, 256, 2
    import datasets

    torch.set_num_threads(1)
    print(f"bench_async_save: {environment()}")
    rows = (args.warmup + args.steps + 2) * args.batch_size
    generator = np.random.default_rng(0)
    data = datasets.Dataset.from_dict({"features": generator.standard_normal((rows, 64), dtype=np.float32),
                                       "label": generator.integers(0, 10, rows)})
    windows = instrument()
    steps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    during: dict[str, list[float]] = {name: [] for name in VARIANTS}
    outside: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        for r, variant in rounds(list(VARIANTS), args.warmup_rounds + args.rounds):
            durations, flags = run(variant, args, data, Path(tmp), windows)
            if r < args.warmup_rounds:
                continue
            steps[variant] += durations
            during[variant] += [d for d, flag in zip(durations, flags) if flag]
            outside[variant] += [d for d, flag in zip(durations, flags) if not flag]

    parameters = sum(p.numel() for p in MLP([64, *[args.width] * args.layers, 10]).parameters())
    print(f"\n### step time around `last` saves: MLP {parameters / 1e6:.1f}M parameters "
          f"({parameters * 12 / 1e6:.0f} MB with AdamW state), batch {args.batch_size}, 1 thread, "
          f"a save every {args.every} steps, {args.steps} timed steps x {args.rounds} rounds\n")
    reference = statistics.median(steps["none"])
    reference_mean = statistics.fmean(steps["none"])
    out = []
    for name, label in VARIANTS.items():
        picked = during[name] if name != "none" else steps[name]
        what = "all steps" if name == "none" else "steps during a save"
        for kind, values in ((what, picked), ("all steps", steps[name]) if name != "none" else (None, None)):
            if kind is None or not values:
                continue
            median, mean = statistics.median(values), statistics.fmean(values)
            # The same runs' steps outside a save: a reference that shares their machine's mood.
            same = statistics.median(outside[name]) if name != "none" and kind != "all steps" and outside[name] else None
            out.append([label, kind, str(len(values)), f"{median * 1e3:.1f}", f"{median / reference:.2f}x",
                        f"{mean * 1e3:.1f}", f"{mean / reference_mean:.2f}x", f"{median / same:.2f}x" if same else "-"])
    print(table(["variant", "steps", "n", "median ms", "vs none", "mean ms", "mean vs none", "vs outside a save"], out))
    if args.json:
        args.json.write_text(json.dumps({"steps": {name: {"all steps ms": [v * 1e3 for v in steps[name]],
                                                          "steps during a save ms": [v * 1e3 for v in during[name]]}
                                                   for name in VARIANTS}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
