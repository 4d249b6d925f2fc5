"""Integrations with training frameworks (DESIGN.md §2): ``integrations.transformers``.

Layer-wise updates live in ``lowrank_kernels.optim.layerwise``. The transformers module is
imported on demand, so lowrank_kernels itself does not depend on transformers.
"""
