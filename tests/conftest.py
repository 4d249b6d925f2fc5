"""Test-session setup: Triton runs in its interpreter when no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs; the kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("LOWRANK_BACKEND", None)  # tests choose backends explicitly
