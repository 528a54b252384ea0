"""Milliseconds per training step: this package's trainer against a hand-written loop and its peers.

    python bench/bench_step.py                    # all three workloads, 5 rounds
    python bench/bench_step.py --quick            # smoke run: a few steps, one round
    python bench/bench_step.py --workload tiny --variants hand,trainer --rounds 9
    python bench/bench_step.py --workload both    # the in-epoch workloads only (tiny, compute)
    python bench/bench_step.py --workload small-epochs   # a whole run over many small epochs

Variants, on the same model, data, optimizer (AdamW, fused when torch has it on CPU, decay on
matrices only, lr 1e-3) and batch size:
  (a) hand      a hand-written loop over pre-batched tensors: the limit
  (b) loader    the same loop through a torch DataLoader over a TensorDataset
  (e) accel     the same loop through accelerate: prepare() and accelerator.backward
  (c) trainer   AcceleratedTrainer as a user runs it: metrics.jsonl every 10 steps, progress bar on,
                wandb disabled, the constant schedule stepped each step
  (c') trainer-default   the same with the config's default optimizer kwargs (torch's own pick)
  (d) lightning, hf      Lightning and HF Trainer with their defaults, when installed

How a step is timed: every variant trains the same MLP, whose forward records
time.perf_counter() (and time.process_time() at the window's two ends). ms/step is
(stamp[warmup + steps] - stamp[warmup]) / steps, so it covers whole steps, forward to forward: data loading, backward, optimizer,
scheduler, logging and the progress bar. It leaves out construction, the warm-up steps and what
a framework does after its last step (the package's final checkpoint). On the in-epoch workloads
(tiny, compute) the data is long enough that every variant stays inside its first epoch, so no
epoch-end validation or checkpoint falls in the window. Wall time is what a user waits for. CPU
time (the whole process's) does not count the time other jobs on a shared machine hold the
cores, so it is the steadier figure there.

The small-epochs workload is a whole run as a user runs it: the tiny MLP over all 1,797 digits
rows (the shipped train and validation files together, as training data), batch 64, so 29 steps
per epoch, and 3,000 steps, about 100 epochs. It is timed from the first step's forward to the
last step's, with no warm-up, so every epoch boundary but the run's end is in the window: the
trainer's default `last` save at each epoch end (asynchronous), its per-epoch loader set-up,
the progress bar's new epoch. Validation and trackers are off (validation_split 0, wandb
disabled), so only what every run pays is measured. The hand-written loop re-shuffles each epoch
as one would write it (a permutation, one gather of the tensors, then slices); the DataLoader
and accelerate loops re-iterate their shuffling loader; Lightning keeps its default checkpoint
at each epoch end, the HF Trainer saves nothing (save_strategy "no", as on the other workloads).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from common import REPO, environment, rounds, silenced, summary, table
from stamped import MLP
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VARIANTS = {
    "hand": "(a) hand-written loop, pre-batched tensors",
    "loader": "(b) same loop, torch DataLoader(TensorDataset)",
    "accel": "(e) same loop, plain accelerate (prepare + backward)",
    "trainer": "(c) AcceleratedTrainer, same fused AdamW",
    "trainer-default": "(c') AcceleratedTrainer, default AdamW kwargs",
    "lightning": "(d) Lightning Trainer, defaults",
    "hf": "(d) HF transformers Trainer, defaults",
}
PEERS = {"lightning": "lightning", "hf": "transformers"}
QUICK = ["hand", "loader", "accel", "trainer"]


@dataclass
class Workload:
    name: str
    description: str
    dims: list[int]
    batch_size: int
    threads: int
    warmup: int
    steps: int
    features: np.ndarray  # (rows, dims[0]) float32; in-epoch: rows >= (warmup + steps + 2) * batch_size
    labels: np.ndarray  # (rows,) int64
    reshuffle: bool = False  # the hand-written loop shuffles each epoch (the in-epoch ones never see a second)

    @property
    def total_steps(self) -> int:
        # One more than warmup + steps: the window ends at the forward of the step after it.
        return self.warmup + self.steps + 1

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)


def digits(*splits: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, labels) of the shipped digits parquet files, the splits concatenated."""
    tables = [pq.read_table(REPO / "data" / "digits" / f"{split}.parquet") for split in splits]
    pixels = np.concatenate([np.asarray(t.column("pixels").combine_chunks().flatten(), dtype=np.float32).reshape(t.num_rows, -1)
                             for t in tables])
    return pixels, np.concatenate([t.column("label").to_numpy().astype(np.int64) for t in tables])


def tiny_workload(steps: int, warmup: int) -> Workload:
    pixels, labels = digits("train")
    # Repeated so one epoch is longer than the timed window (the trainer validates and saves at epoch ends).
    repeat = math.ceil((warmup + steps + 2) * 64 / len(labels))
    return Workload("tiny", f"MLP 64-128-10 on digits ({len(labels)} rows x{repeat}), batch 64, 1 thread",
                    [64, 128, 10], 64, 1, warmup, steps, np.tile(pixels, (repeat, 1)), np.tile(labels, repeat))


def small_epochs_workload(steps: int) -> Workload:
    # All of load_digits: the shipped files split it 80/20; here both are training data.
    pixels, labels = digits("train", "validation")
    w = Workload("small-epochs", "", [64, 128, 10], 64, 1, 0, steps, pixels, labels, reshuffle=True)
    w.description = (f"MLP 64-128-10 on digits ({len(labels)} rows: train + validation files), batch 64 = "
                     f"{w.steps_per_epoch} steps per epoch, 1 thread, the whole run of {w.total_steps} steps "
                     f"({w.total_steps / w.steps_per_epoch:.0f} epochs; epoch ends in the window; trainer: default "
                     "cadence, an asynchronous `last` save every epoch end; validation and trackers off)")
    return w


def compute_workload(steps: int, warmup: int, threads: int) -> Workload:
    rows = (warmup + steps + 2) * 256
    generator = np.random.default_rng(0)
    features = generator.standard_normal((rows, 784), dtype=np.float32)
    labels = generator.integers(0, 10, rows, dtype=np.int64)
    return Workload("compute", f"MLP 784-1024-1024-10 on random data, batch 256, {threads} thread(s)",
                    [784, 1024, 1024, 10], 256, threads, warmup, steps, features, labels)


# ---------------------------------------------------------------- the model and optimizer all share

def fused_adamw_works() -> bool:
    try:
        probe = nn.Parameter(torch.zeros(2))
        probe.grad = torch.ones(2)
        torch.optim.AdamW([probe], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


FAST_KWARGS = {"fused": True} if fused_adamw_works() else {"foreach": True}


def make_optimizer(model: nn.Module, kwargs: dict | None = None) -> torch.optim.Optimizer:
    """AdamW with the package's parameter groups: weight decay on matrices only."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, **(FAST_KWARGS if kwargs is None else kwargs))


def new_model(w: Workload) -> MLP:
    torch.manual_seed(0)
    return MLP(w.dims, cpu_at=(w.warmup, w.warmup + w.steps))


def tensors(w: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(w.features), torch.from_numpy(w.labels)


def loader(w: Workload) -> DataLoader:
    return DataLoader(TensorDataset(*tensors(w)), batch_size=w.batch_size, shuffle=True)


# ---------------------------------------------------------------- variants: each returns the stamped model


def epochs(batches):
    """One epoch after another until the caller stops: each pass re-iterates (re-shuffles) `batches`."""
    while True:
        yield from batches


def run_hand(w: Workload, tmp: Path) -> MLP:
    model = new_model(w)
    optimizer = make_optimizer(model)
    x, y = tensors(w)
    order = torch.Generator().manual_seed(0)
    step = 0
    while step < w.total_steps:
        if w.reshuffle:  # at each epoch's start, as a hand-written loop does: one gather, then slices
            permutation = torch.randperm(len(y), generator=order)
            x, y = x[permutation], y[permutation]
        for features, labels in zip(x.split(w.batch_size), y.split(w.batch_size)):
            loss = F.cross_entropy(model(features), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == w.total_steps:
                break
    return model


def run_loader(w: Workload, tmp: Path) -> MLP:
    model = new_model(w)
    optimizer = make_optimizer(model)
    for step, (features, labels) in enumerate(epochs(loader(w)), 1):
        loss = F.cross_entropy(model(features), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == w.total_steps:
            break
    return model


def run_accelerate(w: Workload, tmp: Path) -> MLP:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True)
    model = new_model(w)
    prepared, optimizer, batches = accelerator.prepare(model, make_optimizer(model), loader(w))
    for step, (features, labels) in enumerate(epochs(batches), 1):
        loss = F.cross_entropy(prepared(features), labels)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == w.total_steps:
            break
    return model


def trainer_config(w: Workload, tmp: Path, optimizer_kwargs: dict) -> dict:
    return {
        "dataset_options": {"feature_columns": ["features"], "label_column": "label", "batch_size": w.batch_size,
                            "validation_split": 0},
        "training_options": {"n_epochs": math.ceil(w.total_steps / w.steps_per_epoch), "max_steps": w.total_steps,
                             "log_every_n_steps": 10,
                             "optimizer": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.01, "kwargs": optimizer_kwargs}},
        "experiment_options": {"title": "trainer", "ckpt_dir": str(tmp), "overwrite": True, "progress_bar": True,
                               "wandb": {"mode": "disabled"}},
    }


_datasets: dict[str, object] = {}


def _train_dataset(w: Workload):
    import datasets

    if w.name not in _datasets:  # built once per workload, outside every timed window
        _datasets[w.name] = datasets.Dataset.from_dict({"features": w.features, "label": w.labels})
    return _datasets[w.name]


def run_trainer(w: Workload, tmp: Path, optimizer_kwargs: dict | None = None) -> MLP:
    from accelerated_trainer import AcceleratedTrainer

    model = new_model(w)
    config = trainer_config(w, tmp, FAST_KWARGS if optimizer_kwargs is None else optimizer_kwargs)
    AcceleratedTrainer(model, config, train_dataset=_train_dataset(w)).train()
    return model


def run_trainer_default(w: Workload, tmp: Path) -> MLP:
    return run_trainer(w, tmp, optimizer_kwargs={})


def run_lightning(w: Workload, tmp: Path) -> MLP:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, net: MLP):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            features, labels = batch
            loss = F.cross_entropy(self.net(features), labels)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return make_optimizer(self.net)

    model = new_model(w)
    trainer = L.Trainer(max_steps=w.total_steps, accelerator="cpu", devices=1, log_every_n_steps=10,
                        default_root_dir=str(tmp), enable_model_summary=False)
    trainer.fit(Module(model), loader(w))
    return model


def run_hf(w: Workload, tmp: Path) -> MLP:
    from transformers import Trainer, TrainingArguments

    class WithLoss(nn.Module):  # HF Trainer expects the model to return its loss
        def __init__(self, net: MLP):
            super().__init__()
            self.net = net

        def forward(self, features, labels):
            logits = self.net(features)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class Rows(torch.utils.data.Dataset):  # rows as dicts, stacked by HF's default collator
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"features": self.x[i], "labels": self.y[i]}

    model = new_model(w)
    optimizer = make_optimizer(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = TrainingArguments(output_dir=str(tmp), per_device_train_batch_size=w.batch_size, max_steps=w.total_steps,
                             logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=False)
    Trainer(model=WithLoss(model), args=args, train_dataset=Rows(*tensors(w)), optimizers=(optimizer, schedule)).train()
    return model


RUNNERS = {"hand": run_hand, "loader": run_loader, "accel": run_accelerate, "trainer": run_trainer,
           "trainer-default": run_trainer_default, "lightning": run_lightning, "hf": run_hf}


# ---------------------------------------------------------------- measuring and reporting


def measure(w: Workload, variants: list[str], n_rounds: int, log: Path | None) -> tuple[dict, list[float]]:
    """{variant: ([wall ms/step per round], [CPU ms/step per round])}, and the trainer's own
    figure from its metrics.jsonl."""
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in variants}
    from_jsonl: list[float] = []
    for r, name in rounds(variants, n_rounds):
        torch.set_num_threads(w.threads)  # frameworks may change it; every variant starts alike
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp, silenced(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = RUNNERS[name](w, Path(tmp))
            if name == "trainer" and (ms := _jsonl_ms_per_step(Path(tmp) / "trainer" / "metrics.jsonl", w.batch_size)):
                from_jsonl.append(ms)
        if len(model.stamps) < w.total_steps:
            raise RuntimeError(f"{name} ran {len(model.stamps)} forwards, expected {w.total_steps}")
        for clock, stamps in enumerate((model.stamps, model.cpu_stamps)):
            results[name][clock].append((stamps[w.warmup + w.steps] - stamps[w.warmup]) / w.steps * 1e3)
    return results, from_jsonl


def _jsonl_ms_per_step(path: Path, batch_size: int) -> float | None:
    # The trainer's own figure: samples_per_s of each logging window after the first (warm-up) one.
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rates = [row["samples_per_s"] for row in rows if "samples_per_s" in row][1:]
    return batch_size / float(np.median(rates)) * 1e3 if rates else None


def report(w: Workload, results: dict[str, tuple[list[float], list[float]]]) -> str:
    base = [summary(results["hand"][clock])[0] for clock in (0, 1)] if "hand" in results else None
    rows = []
    for name, (wall, cpu) in results.items():
        median, low, high = summary(wall)
        cpu_median, cpu_low, cpu_high = summary(cpu)
        label = VARIANTS[name] + (", shuffled each epoch" if name == "hand" and w.reshuffle else "")
        rows.append([label, f"{median:.3f}", f"{low:.3f}-{high:.3f}", f"{median / base[0]:.2f}x" if base else "-",
                     f"{cpu_median:.3f}", f"{cpu_low:.3f}-{cpu_high:.3f}", f"{cpu_median / base[1]:.2f}x" if base else "-"])
    n_rounds = len(next(iter(results.values()))[0])
    head = (f"### {w.name}: {w.description}; {w.steps} timed steps after {w.warmup} warm-up, "
            f"{n_rounds} rounds; optimizer AdamW({', '.join(f'{k}={v}' for k, v in FAST_KWARGS.items())})")
    header = ["variant", "ms/step median", "min-max", "vs (a)", "CPU ms/step median", "CPU min-max", "CPU vs (a)"]
    return head + "\n\n" + table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["tiny", "compute", "small-epochs", "both", "all"], default="all",
                        help="both: the in-epoch ones (tiny, compute); all: those and small-epochs (default)")
    parser.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; with "
                        "--quick: hand, loader, accel, trainer, as the peers' imports alone outlast a smoke run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny-steps", type=int, default=400)
    parser.add_argument("--compute-steps", type=int, default=30)
    parser.add_argument("--small-epochs-steps", type=int, default=3000, help="the whole run's timed steps")
    parser.add_argument("--compute-threads", type=int, default=1,
                        help="torch threads for the compute-bound workload (1: least noise on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="a few steps and one round: a smoke run, not a measurement")
    parser.add_argument("--log", type=Path, default=None, help="keep the frameworks' output (bars, banners) in this file")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the raw ms/step figures here (bench/compare_commits.py reads them)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.tiny_steps, args.compute_steps, args.small_epochs_steps = 1, 10, 2, 60
    if args.variants is None:
        args.variants = ",".join(QUICK if args.quick else VARIANTS)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    skipped = [v for v in variants if v in PEERS and importlib.util.find_spec(PEERS[v]) is None]
    variants = [v for v in variants if v not in skipped]
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    print(f"bench_step: {environment()}")
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)} (pip install -e \".[bench]\")")
    workloads = []
    if args.workload in ("tiny", "both", "all"):
        workloads.append(tiny_workload(args.tiny_steps, warmup=3 if args.quick else 30))
    if args.workload in ("compute", "both", "all"):
        workloads.append(compute_workload(args.compute_steps, warmup=1 if args.quick else 3, threads=args.compute_threads))
    if args.workload in ("small-epochs", "all"):
        workloads.append(small_epochs_workload(args.small_epochs_steps))
    raw = {}
    for w in workloads:
        results, from_jsonl = measure(w, variants, args.rounds, args.log)
        raw[w.name] = {name: {"wall ms/step": wall, "CPU ms/step": cpu} for name, (wall, cpu) in results.items()}
        print()
        print(report(w, results), flush=True)
        if from_jsonl:
            print(f"\n(c) cross-check from metrics.jsonl samples_per_s (logging windows, excluding the log call itself"
                  f"{'; in-epoch windows only, no epoch end' if w.reshuffle else ''}): {np.median(from_jsonl):.3f} ms/step median")
    if args.json:
        args.json.write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
