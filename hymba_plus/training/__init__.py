"""Training stack: config, data, optimizers, checkpoints, the train loop."""
