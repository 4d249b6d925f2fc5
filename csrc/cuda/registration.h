// Registration of the CUDA C++ kernels (csrc/lowrank.cpp declares both namespaces).
//   lowrank::<op>       the public op's CUDA kernel where lowrank_kernels puts no Triton kernel
//                       there (Triton not importable); with Triton, Python registers a later
//                       kernel on the same key (lowrank_kernels/_dispatch.py) and this one waits.
//   lowrank_cuda::<op>  always these kernels: lowrank_kernels.set_cuda_backend("cuda_cxx") and
//                       ops.<op>(..., backend="cuda") call them here.
#pragma once

#include <torch/library.h>

// REGISTER: a function void(torch::Library&) that calls m.impl for the file's ops.
#define LOWRANK_REGISTER_CUDA_KERNELS(REGISTER) \
  TORCH_LIBRARY_IMPL(lowrank, CUDA, m) { REGISTER(m); } \
  TORCH_LIBRARY_IMPL(lowrank_cuda, CUDA, m) { REGISTER(m); }
