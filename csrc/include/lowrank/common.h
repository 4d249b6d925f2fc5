// Portability macros shared by the C++ (host) and CUDA (device) kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LOWRANK_HD __host__ __device__ __forceinline__
#else
#define LOWRANK_HD inline
#endif
