"""Sharded (FSDP2) saves: the Checkpointer's sharded `last` against DCP's own dcp.save, in one run.

    python bench/bench_sharded_save.py              # 25.2M parameters (302 MB with AdamW state) on 2 processes, 5 rounds
    python bench/bench_sharded_save.py --quick      # smoke run: a small model, one round

The script starts itself under torchrun: --processes CPU processes in a gloo group, an MLP
(--width x --width, --layers layers) sharded with torch's fully_shard, AdamW state filled by one
step. The variants save the same model and optimizer state:
  dcp.save          torch.distributed.checkpoint.save with its default FileSystemWriter: one
                    torch.save'd .distcp file per process and a pickled .metadata (fsyncs each
                    file), into a fresh directory
  dcp.async_save    the same through dcp.async_save, on a gloo group of its own
  sharded last      Checkpointer.save_last(asynchronous=False) with the sharded store: DCP's
                    safetensors writer, each process's CRC32 summed while written, JSON for the
                    scalars, one manifest, renamed into the slots (last/previous/older, the
                    oldest rewritten), the index
  sharded last, async   save_last(asynchronous=True): shards staged on the save thread, then
                    written, sealed and published in the background
"blocking" is what the training thread waits for: the call, and for the asynchronous sharded
save also the wait of the next optimizer step for the staging (before_optimizer_step, taken at
once here: in a run the next forward and backward overlap it). "durable" runs until the
checkpoint is complete (published, for the Checkpointer). Both are the slowest process's, as a
collective save is. Every save starts after os.sync(); --warmup-rounds untimed rounds come
first (a first save pays for imports and first allocations, which a run pays once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "dcp.save": "dcp.save, default FileSystemWriter (pickled .metadata)",
    "dcp.async_save": "dcp.async_save, default FileSystemWriter",
    "sharded": "accelerated_trainer sharded last (safetensors, manifest, slots)",
    "sharded-async": "accelerated_trainer sharded last, async_save",
}
BASELINE = "dcp.save"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (imports, first allocations)")
    parser.add_argument("--processes", type=int, default=2, help="CPU processes (gloo), each holding 1/N of the state")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory on /tmp's disk)")
    parser.add_argument("--quick", action="store_true", help="a small model, one round: a smoke run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set when started by torchrun
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.width, args.layers = 1, 256, 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := sorted(set(names) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args.names = names
    return args


def launch(argv: list[str]) -> int:
    """Run this script's workers under torchrun; rank 0 prints the table."""
    args = parse_args(argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes),
               __file__, "--worker", *argv]
    return subprocess.run(command, env={"OMP_NUM_THREADS": "1", **os.environ}).returncode


def build(width: int, layers: int):
    """A fully_shard-ed MLP and its AdamW, state filled by one step."""
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


class Position:
    """The training state a Checkpointer saves in state.json (the step names the checkpoint)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step, "epoch": 0}

    def load_state_dict(self, state):
        self.step = state["step"]


class Savers:
    """One save of each variant: `start(variant, directory)` returns (function that waits until it is complete, blocking s)."""

    def __init__(self, model, optimizer, root: Path):
        import torch.distributed as dist
        from accelerate import Accelerator

        from accelerated_trainer.checkpoint import Checkpointer, ModelState
        from accelerated_trainer.config import CheckpointOptions

        self.model, self.optimizer = model, optimizer
        self.group = dist.new_group(backend="gloo")  # dcp.async_save's, as the sharded store keeps its own
        accelerator = Accelerator(cpu=True)
        options = CheckpointOptions(monitor="val_loss", mode="min", save_top_k=0, save_every_n_steps=None, resume=False,
                                    overwrite=False, async_save=False, on_save_error="stop")
        self.position = Position()
        states = {"model": ModelState(accelerator, model), "optimizer": optimizer, "trainer": self.position}
        self.checkpointer = Checkpointer(root / "run", accelerator, options, states)
        assert type(self.checkpointer.store).__name__ == "ShardedStore"

    def start(self, variant: str, directory: Path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        if variant.startswith("sharded"):
            asynchronous = variant == "sharded-async"
            self.position.step += 1
            started = time.perf_counter()
            self.checkpointer.save_last(0, self.position.step, asynchronous=asynchronous)
            self.checkpointer.before_optimizer_step()  # the staging the next optimizer step waits for
            return self.checkpointer.wait, time.perf_counter() - started
        started = time.perf_counter()
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer,
                                                      options=StateDictOptions(flatten_optimizer_state_dict=True))
        state = {"model": model_state, "optimizer": optimizer_state}
        if variant == "dcp.save":
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)))
            return (lambda: None), time.perf_counter() - started
        future = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(directory)), process_group=self.group)
        return future.result, time.perf_counter() - started

    def close(self) -> None:
        self.checkpointer.finish(0, self.position.step)


def slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def measure(args, savers: Savers, root: Path) -> dict[str, dict[str, list[float]]]:
    import torch.distributed as dist
    from common import rounds

    timings = {name: {"blocking": [], "durable": []} for name in args.names}
    for r, name in rounds(args.names, args.warmup_rounds + args.rounds):
        out = root / name / str(r)
        if dist.get_rank() == 0:
            out.mkdir(parents=True)
            os.sync()
        dist.barrier()
        started = time.perf_counter()
        wait, blocking = savers.start(name, out)
        wait()
        durable = time.perf_counter() - started
        blocking, durable = slowest(blocking), slowest(durable)
        if r >= args.warmup_rounds:
            timings[name]["blocking"].append(blocking)
            timings[name]["durable"].append(durable)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(root / name / str(r - 1), ignore_errors=True)
    return timings


def on_disk(root: Path, name: str) -> int:
    """Bytes of one save of the variant (the Checkpointer's: its `last`)."""
    directory = root / "run" / "last" if name.startswith("sharded") else max((root / name).iterdir(), key=lambda p: int(p.name))
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def report(args, timings, sizes: dict[str, int], n_params: int, payload: int, where: Path) -> None:
    from common import summary, table

    print(f"\n### sharded save: {n_params / 1e6:.1f}M parameters, AdamW state, {payload / 1e6:.0f} MB of tensors over "
          f"{args.processes} processes, {args.rounds} rounds after {args.warmup_rounds} untimed, written under {where}\n")
    base = summary(timings[BASELINE]["durable"])[0] if BASELINE in timings else None
    rows = []
    for name, values in timings.items():
        blocking, durable = summary(values["blocking"]), summary(values["durable"])
        rows.append([VARIANTS[name], f"{sizes[name] / 1e6:.0f}", f"{blocking[0] * 1e3:.0f}", f"{blocking[1] * 1e3:.0f}-{blocking[2] * 1e3:.0f}",
                     f"{durable[0]:.3f}", f"{durable[1]:.3f}-{durable[2]:.3f}", f"{durable[0] / base:.2f}x" if base else "-"])
    print(table(["variant", "MB on disk", "blocking ms median", "min-max", "durable s median", "min-max", "vs dcp.save"], rows))


def work(argv: list[str]) -> int:
    import warnings

    import torch.distributed as dist
    from common import environment

    args = parse_args(argv)
    dist.init_process_group("gloo")
    warnings.simplefilter("ignore")
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"bench_sharded_save: {environment()}", flush=True)
    model, optimizer = build(args.width, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    payload = 3 * n_params * 4  # weights, exp_avg, exp_avg_sq in fp32
    # One directory for all processes: rank 0 makes it, the others learn its name.
    box = [tempfile.mkdtemp(prefix="bench-sharded-", dir=args.dir) if rank0 else None]
    dist.broadcast_object_list(box, src=0)
    root = Path(box[0])
    savers = Savers(model, optimizer, root)
    try:
        timings = measure(args, savers, root)
        savers.close()
        sizes = {name: on_disk(root, name) for name in args.names}
    finally:
        dist.barrier()
        if rank0:
            shutil.rmtree(root, ignore_errors=True)
    if rank0:
        report(args, timings, sizes, n_params, payload, root.parent)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(work(sys.argv[1:]) if "--worker" in sys.argv[1:] else launch(sys.argv[1:]))
