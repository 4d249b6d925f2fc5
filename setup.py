"""Builds the single extension `lowrank_kernels._C`.

C++ CPU sources are always compiled. CUDA sources are compiled when torch is a CUDA build and nvcc
is found, unless LOWRANK_SKIP_CUDA_BUILD=1. TORCH_CUDA_ARCH_LIST (default "8.9;9.0+PTX": RTX 40xx
and H100) and MAX_JOBS are honoured, as by torch.utils.cpp_extension. LOWRANK_EXPERIMENTAL_CUDA=1
also compiles csrc/experimental/*.cu (kernels that have not run on a GPU; see their headers).
"""

import glob
import os
import warnings

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.9;9.0+PTX"


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _build_cuda() -> bool:
    if os.environ.get("LOWRANK_SKIP_CUDA_BUILD", "0") == "1":
        return False
    if torch.version.cuda is None:
        warnings.warn("lowrank_kernels: torch is a CPU-only build; building the CPU extension only")
        return False
    if CUDA_HOME is None:
        warnings.warn("lowrank_kernels: nvcc not found (CUDA_HOME unset); building CPU only")
        return False
    return True


def _extension():
    # -fno-math-errno: sqrt without an errno branch, so that the Adam loops vectorize (nothing here
    # reads errno); -ffp-contract=off: no FMA contraction even where the target has FMA (the
    # kernels' bits are the reference's separately rounded operations; csrc/cpu/cpu_clones.h)
    cxx_flags = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not _build_cuda():
        return CppExtension(
            "lowrank_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]}, extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    defines = ["-DLOWRANK_WITH_CUDA"]
    cuda_sources = _sources("csrc/cuda/*.cu")
    if os.environ.get("LOWRANK_EXPERIMENTAL_CUDA", "0") == "1":
        defines.append("-DLOWRANK_EXPERIMENTAL_CUDA_FAST16")
        cuda_sources += _sources("csrc/experimental/*.cu")
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *defines]
    return CUDAExtension(
        "lowrank_kernels._C", sources + cuda_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-fopenmp", *defines], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    # Triton sources live at the top-level triton_kernels/ (DESIGN.md §2) but are installed as
    # lowrank_kernels.triton_kernels: a top-level `triton_kernels` would shadow another package.
    packages=["lowrank_kernels", "lowrank_kernels.projection", "lowrank_kernels.optim",
              "lowrank_kernels.integrations", "lowrank_kernels.triton_kernels",
              "lowrank_kernels.triton_kernels.experimental"],
    package_dir={"lowrank_kernels.triton_kernels": "triton_kernels",
                 "lowrank_kernels.triton_kernels.experimental": "triton_kernels/experimental"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
