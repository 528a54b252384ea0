# Set-up and the two everyday commands. `make train` and `make test` create .venv on first use.
# GPU users: install the torch build for your CUDA first (or pass TORCH=...), it is kept.
# ARGS go to the training command: make train ARGS="--quiet --set training_options.n_epochs=5"
PYTHON ?= python3
TORCH ?= torch==2.13.0
ARGS ?=
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv train test test-slurm clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# A bare `torch` requirement can pull a multi-GB CUDA build: install the pinned one first, unless present.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

train: venv
	$(BIN)/python train.py --config configs/digits.json --set experiment_options.overwrite=true $(ARGS)

test: venv
	$(BIN)/python -m pytest -q

# launch/slurm_multinode.sbatch under a real Slurm on this machine: needs root, installs
# slurm-wlm and munge with apt when they are missing (tests/slurm/kit).
test-slurm: venv
	$(BIN)/python -m pytest -q -m slurm tests/slurm

clean:
	rm -rf runs wandb
