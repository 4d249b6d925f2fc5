"""Triton kernels of the lowrank ops (installed as lowrank_kernels.triton_kernels)."""
