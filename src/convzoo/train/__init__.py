"""Training engine: loop, distributed set-up, checkpoints, logging, recipes."""
