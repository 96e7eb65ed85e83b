#pragma once
// work: what one pass asks of a device, by kind — dense GEMM FLOPs, fused-attention FLOPs and
// bytes moved by memory-bound kernels (layer norms, activations, dropout, residual adds, softmax,
// cross-entropy, embedding gathers). A hardware profile turns it into seconds (hardware.hpp):
// each kind at its own achievable fraction of the peak. pass_work groups one microbatch's
// forward (F), input-gradient backward (B) and weight-gradient backward (W).

namespace pipit::cost {

struct work {
  double gemm_flops = 0;       // matrix multiplications (tensor cores)
  double attention_flops = 0;  // attention scores and their weighted sum (flash kernels)
  double memory_bytes = 0;     // bytes read + written by memory-bound kernels

  constexpr double flops() const noexcept { return gemm_flops + attention_flops; }
  constexpr work& operator+=(const work& o) noexcept {
    gemm_flops += o.gemm_flops;
    attention_flops += o.attention_flops;
    memory_bytes += o.memory_bytes;
    return *this;
  }
  friend constexpr work operator+(work a, const work& b) noexcept { return a += b; }
  friend constexpr work operator*(work a, double k) noexcept {
    a.gemm_flops *= k;
    a.attention_flops *= k;
    a.memory_bytes *= k;
    return a;
  }
  friend constexpr work operator*(double k, const work& a) noexcept { return a * k; }
  friend constexpr bool operator==(const work&, const work&) = default;
};

// One microbatch's passes through one model part.
struct pass_work {
  work f;  // forward
  work b;  // backward for the input gradient
  work w;  // backward for the weight gradient

  constexpr work total() const noexcept { return f + b + w; }
  constexpr pass_work& operator+=(const pass_work& o) noexcept {
    f += o.f;
    b += o.b;
    w += o.w;
    return *this;
  }
  friend constexpr pass_work operator+(pass_work a, const pass_work& o) noexcept { return a += o; }
  friend constexpr pass_work operator*(pass_work a, double k) noexcept {
    a.f = a.f * k;
    a.b = a.b * k;
    a.w = a.w * k;
    return a;
  }
  friend constexpr bool operator==(const pass_work&, const pass_work&) = default;
};

}  // namespace pipit::cost
