// Shared by the CUDA kernels (their argument checks are csrc/checks.h, shared with the CPU ones): launch
// configuration, and the unpooling that both the top-down and the contrastive update use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"

namespace ep_kernels {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements.
inline int blocks_for(int64_t n, int64_t max_blocks = 65535) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

// u[n, c, yc, xc] = sign * s[n, c, yc / k, xc / k] if that window's argmax is (yc, xc), else 0, for
// the (N, C, HC, WC) map u; positions outside the pooled region (yc >= HP * k) are 0. Each
// element is written once (a gather: no zero-fill pass, coalesced writes). With s2 (the
// contrastive case with a common input) u = unpool(s) - unpool(s2). pool == 1: u = s (- s2).
template <typename scalar_t>
__global__ void unpool_kernel(const scalar_t* __restrict__ s, const int64_t* __restrict__ idx,
                              const scalar_t* __restrict__ s2, const int64_t* __restrict__ idx2,
                              scalar_t* __restrict__ u, int64_t total, int64_t HC, int64_t WC, int64_t HP,
                              int64_t WP, int64_t K, float sign) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t xc = i % WC;
    const int64_t t = i / WC;
    const int64_t yc = t % HC;
    const int64_t plane = t / HC;
    acc_t v = acc_t(0);
    if (yc < HP * K && xc < WP * K) {
      const int64_t p = plane * HP * WP + (yc / K) * WP + (xc / K);
      const int64_t target = yc * WC + xc;
      if (K == 1 || idx[p] == target) v = static_cast<acc_t>(s[p]);
      if (s2 != nullptr && (K == 1 || idx2[p] == target)) v = v - static_cast<acc_t>(s2[p]);
    }
    u[i] = static_cast<scalar_t>(sign < 0.f ? -v : v);
  }
}

// Launches unpool_kernel writing u (contiguous, (N, C, HC, WC)) from contiguous s/idx.
inline void unpool(const at::Tensor& s, const at::Tensor& idx, const at::Tensor& s2, const at::Tensor& idx2,
                   const at::Tensor& u, int64_t pool, float sign) {
  const int64_t total = u.numel();
  if (total == 0) return;
  const int64_t HC = u.size(2), WC = u.size(3), HP = s.size(2), WP = s.size(3);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "ep_kernels_unpool", [&] {
    unpool_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), pool > 1 ? idx.const_data_ptr<int64_t>() : nullptr,
        s2.defined() ? s2.const_data_ptr<scalar_t>() : nullptr,
        (s2.defined() && pool > 1) ? idx2.const_data_ptr<int64_t>() : nullptr, u.mutable_data_ptr<scalar_t>(), total,
        HC, WC, HP, WP, pool, sign);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace ep_kernels
