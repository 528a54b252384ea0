"""A plain accelerate DDP training loop: bench_ddp.py's reference for the trainer's multi-process step.

The job bench_ddp.py also runs through train.py, written the way accelerate's examples are:
the parquet files through `datasets`, a shuffling DataLoader, `accelerator.prepare`, AdamW,
`accelerator.backward`, one epoch after another until --steps optimizer steps. The model is
stamped.LaunchedMLP, whose forward records the clock; rank 0 writes the stamps to --stamps.
The optimizer is the trainer's default pick (AdamW with fused=True where torch has it on the
CPU, weight decay 0.01), so that the two differ in their loops only. No progress bar, no loss
read back: the leanest loop a user writes with accelerate.

    accelerate launch --multi_gpu --num_processes 2 ... bench/plain_accelerate_ddp.py \\
        --data data/digits/train.parquet --features pixels --dims 64,128,10 --batch-size 32 \\
        --steps 100 --stamps /tmp/stamps.json
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import load_dataset
from stamped import LaunchedMLP
from torch.utils.data import DataLoader


def fused_kwargs() -> dict:
    """{"fused": True} where torch's fused AdamW runs on the CPU, else {}."""
    probe = torch.nn.Parameter(torch.zeros(2))
    probe.grad = torch.ones(2)
    try:
        torch.optim.AdamW([probe], fused=True).step()
        return {"fused": True}
    except (RuntimeError, TypeError):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="parquet files, the training data")
    parser.add_argument("--features", default="pixels", help="the feature column (fixed-size lists)")
    parser.add_argument("--dims", required=True, help="the MLP's widths, e.g. 64,128,10")
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps (forwards) in all")
    parser.add_argument("--cpu-at", default="", help="forwards (0-based) at which the CPU time is stamped, e.g. 30,900")
    parser.add_argument("--stamps", type=Path, required=True, help="where rank 0 writes its stamps")
    args = parser.parse_args()

    accelerator = Accelerator()
    set_seed(42)
    dataset = load_dataset("parquet", data_files={"train": args.data})["train"].with_format("torch")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    cpu_at = tuple(int(n) for n in args.cpu_at.split(",") if n)
    model = LaunchedMLP([int(d) for d in args.dims.split(",")], args.steps, str(args.stamps), cpu_at)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **fused_kwargs())
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            loss = F.cross_entropy(model(batch[args.features]), batch["label"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == args.steps:
                break
    accelerator.end_training()


if __name__ == "__main__":
    main()
