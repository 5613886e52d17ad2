"""Shared fixtures. Tests run with one torch thread (2-core machines)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the broker and client tests need no torch
    pass
