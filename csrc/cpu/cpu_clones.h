// Function multiversioning of the CPU kernels' hot elementwise loops. The wheel's baseline is
// x86-64 (SSE2); LOWRANK_CPU_CLONES compiles a function twice, for AVX2 and for that baseline, and
// the dynamic loader picks one per machine (GCC target_clones; x86-64 Linux only, elsewhere the
// plain function). Neither clone enables FMA, and the build passes -ffp-contract=off besides: the
// kernels' bits are separately rounded multiplies and adds.
//
// The loops vectorize only if the compiler may if-convert float compares and call sqrt without
// an errno branch, which GCC's defaults -ftrapping-math and -fmath-errno forbid: a file with such
// loops starts with `#pragma GCC optimize("no-trapping-math")`, and the build passes
// -fno-math-errno (setup.py, CMakeLists.txt; the pragma does not reach sqrt). Nothing in this
// package reads FP exception flags or errno, and the results are the same IEEE operations.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LOWRANK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define LOWRANK_HAVE_AVX2_CLONES 1
#else
#define LOWRANK_CPU_CLONES
#endif
