#pragma once
// blas_handle: an owning cuBLAS handle. Creating one costs milliseconds and device memory, so a
// program makes one per device (per host thread that drives it) and hands it to every layer.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <utility>

#include "pipit/cuda/cublas_check.cuh"

namespace pipit::cuda {

class blas_handle {
 public:
  blas_handle() : owned_(true) { PIPIT_CUBLAS_CHECK(cublasCreate(&h_)); }
  // Uses a handle made elsewhere (a framework's) without taking ownership.
  static blas_handle borrow(cublasHandle_t h) noexcept { return blas_handle(h); }
  blas_handle(blas_handle&& o) noexcept
      : h_(std::exchange(o.h_, nullptr)), owned_(std::exchange(o.owned_, false)) {}
  blas_handle& operator=(blas_handle&& o) noexcept {
    std::swap(h_, o.h_);
    std::swap(owned_, o.owned_);
    return *this;
  }
  blas_handle(const blas_handle&) = delete;
  blas_handle& operator=(const blas_handle&) = delete;
  ~blas_handle() {
    if (h_ && owned_) (void)cublasDestroy(h_);
  }

  cublasHandle_t get() const noexcept { return h_; }
  // The stream the next calls are enqueued on (cheap: set before every use).
  void set_stream(cudaStream_t s) const { PIPIT_CUBLAS_CHECK(cublasSetStream(h_, s)); }

 private:
  explicit blas_handle(cublasHandle_t h) noexcept : h_(h) {}
  cublasHandle_t h_ = nullptr;
  bool owned_ = false;
};

}  // namespace pipit::cuda
