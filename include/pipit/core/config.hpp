#pragma once
// Compiler and execution-space configuration shared by every pipit header.
// This header must stay includable by any C++20 compiler: it never includes a CUDA header.

#if defined(__CUDACC__) || defined(__HIPCC__)  // nvcc (both passes) or clang -x cuda
#define PIPIT_HOST_DEVICE __host__ __device__
#define PIPIT_DEVICE_COMPILER 1
#else
#define PIPIT_HOST_DEVICE
#define PIPIT_DEVICE_COMPILER 0
#endif

#if defined(__CUDA_ARCH__)  // the device pass of a CUDA compilation
#define PIPIT_IN_DEVICE_CODE 1
#else
#define PIPIT_IN_DEVICE_CODE 0
#endif

#if defined(_MSC_VER)
#define PIPIT_FORCEINLINE __forceinline
#else
#define PIPIT_FORCEINLINE inline __attribute__((always_inline))
#endif

#if __cplusplus < 202002L && !defined(_MSVC_LANG)
#error "pipit requires C++20 (compile with -std=c++20, or link the pipit::pipit CMake target)"
#endif
