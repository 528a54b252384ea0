"""Train on plain torch data through the Python API, for `accelerate launch` with several processes.

    accelerate launch ... tests/helpers/torch_data_run.py RUN_ROOT {map-style|DataLoader}

Each process writes RUN_ROOT/report/rank{N}.json: its rank, the optimizer steps, the rows it
trained on (their ids, the first feature column) and the validation metrics. A file, not a line
on stdout: the processes share the launcher's stdout, where another process's run summary can
land in the middle of a line.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from accelerated_trainer import AcceleratedTrainer  # noqa: E402
from conftest import digits_config  # noqa: E402

root, kind = sys.argv[1], sys.argv[2]
generator = torch.Generator().manual_seed(0)
x = torch.randn(250, 8, generator=generator)
x[:, 0] = torch.arange(250)  # the row's id: no information about the label
y = x[:, 1:4].argmax(dim=1)
validation = TensorDataset(x[:101], y[:101])
train = TensorDataset(x, y) if kind == "map-style" else DataLoader(TensorDataset(x, y), batch_size=25, shuffle=True)
config = digits_config(Path(root), dataset_options={"data_files": {}, "feature_columns": [], "batch_size": 25},
                       training_options={"n_epochs": 3, "monitor": "val_accuracy", "optimizer": {"name": "AdamW", "lr": 0.01},
                                         "scheduler": "constant", "save_top_k": 1, "seed": 0})
seen = []
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
trainer = AcceleratedTrainer(model, config, train_dataset=train, eval_dataset=validation)
trainer.model.register_forward_pre_hook(lambda module, args: seen.extend(args[0][:, 0].long().tolist()) if module.training else None)
result = trainer.train()
report = Path(root) / "report" / f"rank{trainer.accelerator.process_index}.json"
report.parent.mkdir(exist_ok=True)
report.write_text(json.dumps({"rank": trainer.accelerator.process_index, "steps": result.steps, "seen": seen, "metrics": result.metrics}))
trainer.accelerator.end_training()
# Leave as the CLI does after a run of several processes (cli.run_and_exit): at the
# interpreter's teardown gloo's threads sometimes abort a process whose run succeeded.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
