"""What the checkpoint tests share: a clean Accelerator, a trained model with its optimizer and
schedule, and a stand-in for the trainer's TrainingState."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


@pytest.fixture
def accelerator():
    # The Accelerator state is a process-wide singleton: start clean and leave clean.
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class TrainingPosition:
    """What the trainer registers as "trainer" (its TrainingState): JSON at the top of state.json."""

    def __init__(self):
        self.state = {}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = {key: state[key] for key in ("step", "epoch", "position") if key in state}


def trained(seed=0, steps=3, width=8, decay=1.0):
    """A small MLP, its AdamW and a LambdaLR (the LR times decay**step), after `steps` steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = LambdaLR(optimizer, lambda step: decay ** step)
    for _ in range(steps):
        model(torch.randn(6, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler
