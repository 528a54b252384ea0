"""Train a model sharded with torch's fully_shard through the Python API, for tests/test_sharded_training.py.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... tests/helpers/sharded_run.py RUN_ROOT --batch-size 32
    python tests/helpers/sharded_run.py RUN_ROOT --batch-size 64        # one process: the model stays plain

A 16-33-3 MLP (33 rows shard 17/16 on 2 processes; the last layer's 3 rows leave a process of
4 an empty shard) trained with AdamW, a cosine schedule and top-k checkpoints on 256 rows
of synthetic classification data: 4 optimizer steps per epoch at a global batch of 64, 3
epochs, `last` every 3 steps and at each epoch end. With several processes the model is
sharded (every Linear and the root, on a gloo mesh) before the trainer is built; with one it
stays plain, the reference an unsharded run is compared with.

--resume resumes from the run directory; --resume-from PATH from that checkpoint. With
FORBID_UNPICKLING=1, pickle.load, pickle.loads, pickle.Unpickler and torch.load raise from
just before train() (the resume happens in it). CRASH_AT: `write:N` makes process CRASH_RANK
(default 1) SIGKILL itself halfway through its shard file in the N-th save of `last`;
`seal:N` makes the main process SIGKILL itself in that save with every shard written, before
the manifest. SLOW_WRITES=S holds DCP's writer S seconds before it writes, so that training
runs ahead of an asynchronous save. Prints one JSON line from the main process at the end; each process writes its
pid to RUN_ROOT/pids/ for the test to kill what is left.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from accelerated_trainer import AcceleratedTrainer  # noqa: E402
from accelerated_trainer.checkpoint import files, sharded  # noqa: E402
from conftest import digits_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_root", type=Path)
    parser.add_argument("--batch-size", type=int, required=True, help="per process: 32 on 2 processes, 64 on 1, 16 on 4")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--resume-from", type=Path, default=None)
    parser.add_argument("--sync", action="store_true", help="experiment_options.async_save false")
    return parser.parse_args()


def data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, 16, generator=generator)
    y = x[:, :3].argmax(dim=1)
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


def model(processes: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 3))
    if processes > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (processes,))
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
    return net


def arm_crash(state: PartialState) -> None:
    point, _, nth = os.environ.get("CRASH_AT", "").partition(":")
    if not point:
        return
    saves = {"count": 0}
    write = sharded.ShardedStore.write

    def counted(self, *args, **kwargs):
        saves["count"] += 1
        return write(self, *args, **kwargs)

    sharded.ShardedStore.write = counted
    if point == "write" and state.process_index == int(os.environ.get("CRASH_RANK", "1")):
        stream_write = sharded._SummingStream.write

        def half_then_die(self, data):
            if saves["count"] != int(nth):
                return stream_write(self, data)
            view = memoryview(data).cast("B")
            self._stream.write(view[:len(view) // 2])
            self._stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        sharded._SummingStream.write = half_then_die
    elif point == "seal" and state.is_main_process:
        seal = files.seal

        def die_before_manifest(directory, checksums=None):
            if directory.name == ".last.tmp" and saves["count"] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
            return seal(directory, checksums)

        files.seal = die_before_manifest


def slow_down_writes(seconds: float) -> None:
    import time

    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    write_data = HuggingFaceStorageWriter.write_data

    def slow_write_data(self, plan, planner):
        time.sleep(seconds)
        return write_data(self, plan, planner)

    HuggingFaceStorageWriter.write_data = slow_write_data


def forbid_unpickling() -> None:
    """From here on, anything that unpickles a file or bytes raises. torch.distributed's object
    collectives keep the Unpickler they bound at import: they unpickle what the other processes
    sent over the wire, never a file."""
    import pickle

    import torch.serialization

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while resuming a sharded checkpoint")

    pickle.load = pickle.loads = pickle.Unpickler = refuse
    torch.load = torch.serialization.load = refuse


def main() -> None:
    args = parse_args()
    # The process group, which fully_shard needs before the trainer is built (gloo: these tests run on CPU).
    state = PartialState(cpu=True)
    (args.run_root / "pids").mkdir(parents=True, exist_ok=True)
    (args.run_root / "pids" / f"rank{state.process_index}.pid").write_text(str(os.getpid()))
    train, validation = data()
    resume = str(args.resume_from) if args.resume_from else args.resume
    config = digits_config(args.run_root, dataset_options={"data_files": {}, "feature_columns": [], "batch_size": args.batch_size},
                           training_options={"n_epochs": 3, "monitor": "val_loss", "optimizer": {"name": "AdamW", "lr": 0.01},
                                             "save_every_n_steps": 3, "save_top_k": 2, "log_every_n_steps": 2, "seed": 0},
                           experiment_options={"title": "sharded", "resume": resume, "async_save": not args.sync})
    trainer = AcceleratedTrainer(model(state.num_processes), config, train_dataset=train, eval_dataset=validation)
    arm_crash(state)
    if os.environ.get("SLOW_WRITES"):
        slow_down_writes(float(os.environ["SLOW_WRITES"]))
    if os.environ.get("FORBID_UNPICKLING") == "1":
        forbid_unpickling()
    result = trainer.train()
    if state.is_main_process:
        print(json.dumps({"steps": result.steps, "sharded": trainer.model_state.sharded, "processes": state.num_processes,
                          "unpickling": "forbidden" if os.environ.get("FORBID_UNPICKLING") == "1" else "allowed",
                          "best": result.best_checkpoint and str(result.best_checkpoint)}), flush=True)
    trainer.accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main()
    # Leave as the CLI does after a run of several processes (cli.run_and_exit): at the
    # interpreter's teardown gloo's threads sometimes abort a process whose run succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
