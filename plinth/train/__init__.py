"""Training: one loop for pretraining and fine-tuning, checkpoints, recipes."""
