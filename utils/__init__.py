"""Training utilities: distributed setup, logging, AMP stepping, optimizer, schedule, checkpoints, loops."""
