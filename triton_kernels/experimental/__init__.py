"""Experimental Triton kernels: on no default path, in no default test or AOT matrix (each
module says what measurement would earn it a return)."""
