"""Seconds to write one checkpoint of a ~25M-parameter model with its AdamW state, several ways.

    python bench/bench_checkpoint.py              # 25.2M parameters (302 MB with AdamW state), 5 rounds
    python bench/bench_checkpoint.py --quick      # smoke run: a small model, one round

Variants, all writing the same tensors (weights, exp_avg, exp_avg_sq) into a fresh directory:
  raw           the tensors' bytes into one file, then fsync: what the disk allows
  safetensors   one safetensors file with every tensor (save_file), without and with fsync
  save_state    accelerator.save_state (safetensors weights, pickled optimizer, RNG; no fsync)
  save_last     this package's Checkpointer.save_last: files (each piece's CRC32 for the manifest
                summed while it is written), fsync, rename into place; from the third save on it
                writes over the files of the old `previous`, as in training
  async-stall   the same with asynchronous=True: only the call (module buffers copied, the rest
                handed to the background thread); the write then finishes untimed. What the
                training step waits for is measured by bench/bench_async_save.py
  async-durable the same with asynchronous=True, timed until the new `last` is renamed into
                place and checkpoints.json lists it: the host copy and the write. The bench
                waits for it at once, so it is written flat out, not paced as in training
MB/s is the tensor payload (the raw variant's bytes) over the seconds, whatever the format adds.
Each timed save starts after os.sync(), so no variant pays for another's dirty pages, and
writes next to its previous output, deleted only afterwards, as save_last's `last` is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import environment, rounds, silenced, summary, table
from torch import nn

VARIANTS = {
    "raw": "raw write + fsync of the same bytes",
    "safetensors": "safetensors save_file, one file (no fsync)",
    "safetensors-fsync": "safetensors save_file, one file, + fsync",
    "save_state": "accelerator.save_state (no fsync)",
    "save_last": "accelerated_trainer Checkpointer.save_last",
    "async-stall": "save_last(asynchronous=True): the call itself",
    "async-durable": "save_last(asynchronous=True) until published and indexed",
}


def build(width: int, layers: int):
    """A prepared model and AdamW with its state filled by one step."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return accelerator, model, optimizer, scheduler


def all_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if value.ndim:  # the step counters are scalars, a few bytes
                tensors[f"optimizer.{i}.{key}"] = value
    return tensors


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_raw(out: Path, ctx) -> None:
    with open(out / "raw.bin", "wb") as f:
        f.writelines(memoryview(tensor.numpy()).cast("B") for tensor in ctx["tensors"].values())
        f.flush()
        os.fsync(f.fileno())
    _fsync(out)


def save_safetensors(out: Path, ctx, fsync: bool = False) -> None:
    from safetensors.torch import save_file

    save_file(ctx["tensors"], str(out / "all.safetensors"))
    if fsync:
        _fsync(out / "all.safetensors")
        _fsync(out)


def save_accelerate(out: Path, ctx) -> None:
    ctx["accelerator"].save_state(str(out / "state"))


def save_last(out: Path, ctx, asynchronous: bool = False, wait: bool = True) -> None:
    ctx["position"].step = ctx["step"]
    ctx["checkpointer"].save_last(0, ctx["step"], asynchronous=asynchronous)
    ctx["step"] += 1
    if wait:
        ctx["checkpointer"].wait()


SAVERS = {"raw": save_raw, "safetensors": save_safetensors,
          "safetensors-fsync": lambda out, ctx: save_safetensors(out, ctx, fsync=True),
          "save_state": save_accelerate, "save_last": save_last,
          "async-stall": lambda out, ctx: save_last(out, ctx, asynchronous=True, wait=False),
          "async-durable": lambda out, ctx: save_last(out, ctx, asynchronous=True)}
LAST = ("save_last", "async-stall", "async-durable")  # these write the run's `last`


def record_index_writes() -> list[float]:
    """Times at which checkpoints.json is rewritten: the moment a save is complete and recorded."""
    from accelerated_trainer.checkpoint import files

    stamps, write = [], files.atomic_write_json

    def atomic_write_json(path, data):
        write(path, data)
        stamps.append(time.perf_counter())

    files.atomic_write_json = atomic_write_json
    return stamps


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory on /tmp's disk)")
    parser.add_argument("--quick", action="store_true", help="a small model, one round: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.width, args.layers = 1, 256, 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    from accelerated_trainer.checkpoint import Checkpointer, ModelState
    from accelerated_trainer.config import CheckpointOptions
    from accelerated_trainer.trainer import TrainingState

    print(f"bench_checkpoint: {environment()}")
    warnings.simplefilter("ignore")
    accelerator, model, optimizer, scheduler = build(args.width, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    ctx = {"accelerator": accelerator, "model": model, "optimizer": optimizer, "scheduler": scheduler,
           "tensors": all_tensors(model, optimizer), "step": 1, "position": TrainingState()}
    options = CheckpointOptions(monitor="val_loss", mode="min", save_top_k=0, save_every_n_steps=None, resume=False,
                                overwrite=False, async_save=False, on_save_error="stop")
    states = {"model": ModelState(accelerator, model), "optimizer": optimizer, "scheduler": scheduler,
              "trainer": ctx["position"]}
    ctx["checkpointer"] = Checkpointer(root / "run", accelerator, options, states)
    payload = sum(t.numel() * t.element_size() for t in ctx["tensors"].values())
    indexed = record_index_writes()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    sizes: dict[str, int] = {}
    try:
        for r, name in rounds(names, args.rounds):
            # A fresh directory each round; the one before is deleted only after the timed write,
            # as save_last keeps `last` while writing the next (deleting first would hand the new
            # write the page cache just freed, which is markedly faster on this VM).
            out = root / name / str(r)
            out.mkdir(parents=True, exist_ok=True)
            os.sync()
            with silenced():
                started = time.perf_counter()
                SAVERS[name](out, ctx)
                seconds[name].append(time.perf_counter() - started)
                ctx["checkpointer"].wait()  # async-stall: the write goes on untimed, before the next variant
                if name == "async-durable":
                    seconds[name][-1] = indexed[-1] - started
            sizes[name] = size_of(root / "run" / "last" if name in LAST else out)
            shutil.rmtree(root / name / str(r - 1), ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n### checkpoint: {n_params / 1e6:.1f}M parameters, AdamW state, {payload / 1e6:.0f} MB of tensors, "
          f"{args.rounds} rounds, written under {root.parent}\n")
    base = summary(seconds["raw"])[0] if "raw" in seconds else None
    rows = []
    for name, values in seconds.items():
        median, low, high = summary(values)
        rows.append([VARIANTS[name], f"{sizes[name] / 1e6:.0f}", f"{median:.3f}", f"{low:.3f}-{high:.3f}",
                     f"{payload / 1e6 / median:.0f}", f"{median / base:.2f}x" if base else "-"])
    print(table(["save", "MB on disk", "median s", "min-max", "MB/s", "vs raw"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
