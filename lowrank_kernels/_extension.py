"""Loads the compiled extension ``lowrank_kernels._C`` once, remembering why it failed if it did.

Without the extension the reference (and, on GPUs, Triton) backends keep working; the reason the
fast path is off is kept in ``LOAD_ERROR`` and shown by any call that asks for a C++ backend.
"""

from __future__ import annotations

LOAD_ERROR: str | None = None
try:
    from lowrank_kernels import _C  # noqa: F401  (registers torch.ops.lowrank.*)
except ImportError as exc:  # the build is missing or was made against another torch
    LOAD_ERROR = (
        f"lowrank_kernels._C could not be loaded ({exc}); build it with "
        "`pip install --no-build-isolation -e .` against the installed torch"
    )

AVAILABLE = LOAD_ERROR is None
