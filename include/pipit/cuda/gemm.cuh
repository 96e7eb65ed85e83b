#pragma once
// Row-major GEMMs with fp32 accumulation and fp32 output, over cublasGemmEx. A row-major
// matrix M (r x c, row stride ld) is the column-major M^T (c x r, leading dimension ld), so
// each row-major product is the column-major product of the transposes with A and B swapped.
// Inputs are float, __nv_bfloat16 or __half (both operands the same type); the compute type is
// CUBLAS_COMPUTE_32F: plain fp32 for float inputs (no TF32 unless the handle's math mode or
// NVIDIA_TF32_OVERRIDE asks for it), tensor cores with fp32 accumulation for 16-bit inputs.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "pipit/core/error.hpp"
#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/cublas_check.cuh"

namespace pipit::cuda {

// Element types the kernels and GEMMs accept.
template <class T>
concept gemm_input =
    std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

template <gemm_input T>
inline constexpr cudaDataType_t data_type = std::is_same_v<T, float>           ? CUDA_R_32F
                                            : std::is_same_v<T, __nv_bfloat16> ? CUDA_R_16BF
                                                                               : CUDA_R_16F;

namespace detail_gemm {

inline int dim(std::int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) fail("pipit::cuda::gemm: ", what, " = ", v, " is outside [0, 2^31)");
  return static_cast<int>(v);
}

// Column-major C (m x n) = alpha op(A) op(B) + beta C, A and B of type T, C float.
template <gemm_input T>
void gemm_cm(const blas_handle& h, cudaStream_t s, cublasOperation_t ta, cublasOperation_t tb,
             std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda,
             const T* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS semantics: C = beta C; only beta 0 and 1 are used here
    if (beta == 0.f)
      PIPIT_CUDA_CHECK(cudaMemset2DAsync(c, static_cast<std::size_t>(ldc) * sizeof(float), 0,
                                         static_cast<std::size_t>(m) * sizeof(float),
                                         static_cast<std::size_t>(n), s));
    else if (beta != 1.f)
      fail("pipit::cuda::gemm: k = 0 with beta ", beta, " is not supported");
    return;
  }
  h.set_stream(s);
  const float alpha = 1.f;
  PIPIT_CUBLAS_CHECK(cublasGemmEx(h.get(), ta, tb, dim(m, "m"), dim(n, "n"), dim(k, "k"), &alpha, a,
                                  data_type<T>, dim(lda, "lda"), b, data_type<T>, dim(ldb, "ldb"),
                                  &beta, c, CUDA_R_32F, dim(ldc, "ldc"), CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
}

}  // namespace detail_gemm

// C (m x n) = A (m x k) B^T (B: n x k) + beta C. Logits: Z = X W_c^T.
template <gemm_input T>
void gemm_abt(const blas_handle& h, cudaStream_t s, std::int64_t m, std::int64_t n, std::int64_t k,
              const T* a, std::int64_t lda, const T* b, std::int64_t ldb, float beta, float* c,
              std::int64_t ldc) {
  detail_gemm::gemm_cm<T>(h, s, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, b, ldb, a, lda, beta, c, ldc);
}

// C (m x n) = A (m x k) B (B: k x n) + beta C. Input gradient: dX += dZ W_c.
template <gemm_input T>
void gemm_ab(const blas_handle& h, cudaStream_t s, std::int64_t m, std::int64_t n, std::int64_t k,
             const T* a, std::int64_t lda, const T* b, std::int64_t ldb, float beta, float* c,
             std::int64_t ldc) {
  detail_gemm::gemm_cm<T>(h, s, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, b, ldb, a, lda, beta, c, ldc);
}

// C (m x n) = A^T (A: k x m) B (B: k x n) + beta C. Weight gradient: dW_c += dZ^T X.
template <gemm_input T>
void gemm_atb(const blas_handle& h, cudaStream_t s, std::int64_t m, std::int64_t n, std::int64_t k,
              const T* a, std::int64_t lda, const T* b, std::int64_t ldb, float beta, float* c,
              std::int64_t ldc) {
  detail_gemm::gemm_cm<T>(h, s, CUBLAS_OP_N, CUBLAS_OP_T, n, m, k, b, ldb, a, lda, beta, c, ldc);
}

}  // namespace pipit::cuda
