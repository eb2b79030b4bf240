"""Pre-training: the per-worker loop, sharding, optimizer, checkpoints and metrics."""
