"""Device-agnostic pre-training: XLA SPMD on TPU, DDP on GPUs, CPU for debugging and tests."""
