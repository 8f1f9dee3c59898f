"""The `evaluate` stage: every checkpoint scored against its ground truth, one table."""
