"""Rows per second of shuffled batches: the usual per-row path, this package's loader, and the memory limit.

    python bench/bench_loader.py [--rows 200000] [--width 64] [--batch-size 256] [--rounds 5] [--threads 1] [--quick]

A float32 table of rows x width with an int64 label is written to parquet and loaded the way a
run loads it (datasets' Arrow cache, memory-mapped). Variants, alternated in rounds:

  (a) per-row DataLoader   torch DataLoader(dataset.with_format("torch"), shuffle=True): one
                           dict per row, stacked again by the default collate (the usual path)
  (a') dataset[indices]    datasets' own batched indexing through its formatting layer
  (b) vectorized           this package's loader: one index_select per batch key from columns
                           copied once into contiguous tensors (the default)
  (b') memory-mapped       the same with preload_max_mb=0: the columns written once, contiguous,
                           to the datasets cache and memory-mapped (data beyond the RAM budget)
  (b'') Arrow take         the same over the rows held in memory as datasets wrote them (200
                           record batches) with preload_max_mb=0: one Arrow take per batch, the
                           last resort
  (c) tensor gather        X[perm[i:i+B]], y[...] from tensors already in memory (the limit)

Each variant is timed on the batches of one shuffled epoch (the slow a, a' and b'' on their
first `--slow-batches` batches); the loader's one-time setup is reported apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, rounds, silenced, summary, table  # noqa: E402

from accelerated_trainer import data  # noqa: E402
from accelerated_trainer.config import DatasetOptions  # noqa: E402

VARIANTS = ["(a) per-row DataLoader", "(a') dataset[indices]", "(b) vectorized", "(b') memory-mapped", "(b'') Arrow take",
            "(c) tensor gather"]


def write_table(path: Path, rows: int, width: int) -> None:
    generator = np.random.default_rng(0)
    features = generator.standard_normal((rows, width), dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), width)
    pq.write_table(pa.table({"x": column, "label": pa.array(generator.integers(0, 10, rows))}), path)


def timed_batches(loader, limit: int | None) -> tuple[int, float]:
    rows, started = 0, time.perf_counter()
    for number, batch in enumerate(loader):
        rows += batch["label" if "label" in batch else "labels"].shape[0]
        if limit and number + 1 >= limit:
            break
    return rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slow-batches", type=int, default=40, help="batches timed for the slow variants (a), (a')")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one core, as in the issue's figures)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20,000 rows, 1 round, 5 slow batches")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds, args.slow_batches = 20_000, 1, 5
    torch.set_num_threads(args.threads)
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        datasets.config.HF_DATASETS_CACHE = str(Path(tmp) / "hf-cache")
        path = Path(tmp) / "train.parquet"
        write_table(path, args.rows, args.width)
        options = DatasetOptions(data_files={"train": str(path)}, feature_columns=["x"], validation_split=0.0)
        with silenced():
            dataset = data.load_splits(options, seed=0).train
        in_memory = datasets.Dataset(pa.Table.from_batches(dataset.data.table.to_batches()))  # no cache files
        loaders, setup = {}, {}
        for name, rows, budget in (("(b) vectorized", dataset, options.preload_max_mb), ("(b') memory-mapped", dataset, 0),
                                   ("(b'') Arrow take", in_memory, 0)):
            started = time.perf_counter()
            loaders[name] = data.build_loader(rows, options.model_copy(update={"preload_max_mb": budget}),
                                              label_dtype=torch.long, batch_size=args.batch_size, seed=0, train=True)
            setup[name] = time.perf_counter() - started
        per_row = dataset.with_format("torch", columns=["x", "label"])
        columns = per_row[:]
        features, labels = columns["x"].contiguous(), columns["label"].contiguous()

        def run(variant: str, epoch: int) -> tuple[int, float]:
            generator = torch.Generator().manual_seed(epoch)
            if variant == "(a) per-row DataLoader":
                loader = torch.utils.data.DataLoader(per_row, batch_size=args.batch_size, shuffle=True, generator=generator)
                return timed_batches(loader, args.slow_batches)
            if variant == "(a') dataset[indices]":
                order = torch.randperm(len(dataset), generator=generator)
                batches = (per_row[order[i:i + args.batch_size].tolist()] for i in range(0, len(order), args.batch_size))
                return timed_batches(batches, args.slow_batches)
            if variant == "(c) tensor gather":
                started, order = time.perf_counter(), torch.randperm(len(dataset), generator=generator)
                for i in range(0, len(order), args.batch_size):
                    index = order[i:i + args.batch_size]
                    {"features": features[index], "labels": labels[index]}
                return len(order), time.perf_counter() - started
            loaders[variant].sampler.set_epoch(epoch)
            return timed_batches(loaders[variant], args.slow_batches if variant == "(b'') Arrow take" else None)

        rates = {variant: [] for variant in VARIANTS}
        for number, variant in rounds(VARIANTS, args.rounds):
            rows, seconds = run(variant, number)
            rates[variant].append(rows / seconds)

    gather = summary(rates["(c) tensor gather"])[0]
    usual = summary(rates["(a) per-row DataLoader"])[0]
    rows = []
    for variant in VARIANTS:
        median, low, high = summary(rates[variant])
        rows.append([variant, f"{median:,.0f}", f"{low:,.0f} - {high:,.0f}", f"{median / usual:.1f}x", f"{median / gather:.2f}",
                     f"{setup[variant]:.2f} s" if variant in setup else "-"])
    print(f"{args.rows:,} x {args.width} float32 rows, shuffled, batch {args.batch_size}, {args.rounds} rounds, "
          f"{args.threads} torch thread(s); {environment()}")
    print(table(["variant", "rows/s (median)", "min - max", "vs (a)", "vs (c)", "setup"], rows))


if __name__ == "__main__":
    main()
