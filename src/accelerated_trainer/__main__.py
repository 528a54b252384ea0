"""`python -m accelerated_trainer --config CFG`, also `accelerate launch -m accelerated_trainer --config CFG`."""

from .cli import run_and_exit

if __name__ == "__main__":
    run_and_exit()
