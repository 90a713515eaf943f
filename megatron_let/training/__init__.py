"""The training loop and what it holds: the Trainer, checkpoints."""
