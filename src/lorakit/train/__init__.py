"""Training: tasks, batching and the training loop."""
