"""Training: what trains per stage, the one loop, and resume checkpoints."""
