"""Training: the train step and its state, optimizer, checkpoints, metrics and run control."""
