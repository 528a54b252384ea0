"""Train on digits with two processes, then predict and evaluate N validation rows on both (tests/test_predict.py).

Usage: accelerate launch ... predict_two_processes.py RUN_ROOT OUT N. Rank 0 writes every rank's
predictions and accuracy (gathered to it) to OUT as safetensors: rank0, rank1, accuracy0, accuracy1.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import datasets  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from accelerated_trainer import AcceleratedTrainer  # noqa: E402
from conftest import DIGITS, digits_config  # noqa: E402

root, out, rows = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
config = digits_config(root, training_options={"n_epochs": 1}, dataset_options={"eval_batch_size": 8})
trainer = AcceleratedTrainer(None, config)
trainer.train()
import torch  # noqa: E402

data = datasets.Dataset.from_parquet(str(DIGITS / "validation.parquet")).select(range(rows))
predicted = trainer.predict(data.remove_columns("label"))
accuracy = trainer.evaluate(data)["val_accuracy"]
everyone = gather_object([(predicted, accuracy)])
if trainer.accelerator.is_main_process:
    tensors = {f"rank{rank}": outputs.contiguous() for rank, (outputs, _) in enumerate(everyone)}
    tensors |= {f"accuracy{rank}": torch.tensor(value) for rank, (_, value) in enumerate(everyone)}
    save_file(tensors, str(out))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
# Leave as the CLI does after a run of several processes (cli.run_and_exit): at the
# interpreter's teardown gloo's threads sometimes abort a process whose run succeeded.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
