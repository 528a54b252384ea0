"""A plain accelerate training script: the reference for bench_startup.py's launch-to-first-step time.

The job of `train.py --config configs/digits.json`, written the way accelerate's examples are:
the digits parquet files through `datasets`, an MLP 64-128-10, AdamW, batch 64. After every step
it appends {"step", "train_loss"} to OUT_DIR/metrics.jsonl, as the trainer does with
log_every_n_steps=1, so both are timed by the same signal.

    python bench/plain_accelerate.py OUT_DIR [--max-steps N]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import load_dataset
from torch import nn
from torch.utils.data import DataLoader

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-steps", type=int, default=1)
    args = parser.parse_args()

    accelerator = Accelerator()
    files = {"train": str(DIGITS / "train.parquet"), "validation": str(DIGITS / "validation.parquet")}
    splits = load_dataset("parquet", data_files=files).with_format("torch")
    loader = DataLoader(splits["train"], batch_size=64, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "metrics.jsonl", "a") as log:
        for step, batch in enumerate(loader, 1):
            loss = F.cross_entropy(model(batch["pixels"]), batch["label"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            log.write(json.dumps({"step": step, "train_loss": loss.item()}) + "\n")
            log.flush()
            if step >= args.max_steps:
                break


if __name__ == "__main__":
    main()
