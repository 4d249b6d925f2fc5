"""Benchmarks, DRAM-traffic model, memory accounting and training demo (see run_all.py)."""
