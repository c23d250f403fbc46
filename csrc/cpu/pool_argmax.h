// k x k max-pool of stride k with argmax, over a contiguous (planes, hc, wc) map.
//
// Same rule as ATen's max_pool2d: a value wins if it is strictly greater than the best so far
// or is NaN (ties keep the first position of the window in row-major order; a NaN always wins,
// so the last NaN of a window is reported). Written branch-free (selects instead of jumps:
// which position wins is random, and a mispredicted branch per window is what makes ATen's
// max_pool2d_with_indices cost several ns per element), with the window size a compile-time
// constant for k = 2 and 3, and compiled for AVX-512 / AVX2 / baseline, chosen at run time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace ep_kernels {
namespace pool_argmax {

#define EPK_PA_INLINE inline __attribute__((always_inline))

template <typename scalar_t, int K>
EPK_PA_INLINE void plane(const scalar_t* yp, scalar_t* op, int64_t* ip, int64_t hc, int64_t wc, int64_t kdyn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = K > 0 ? K : kdyn;
  const int64_t hp = hc / k, wp = wc / k;
  for (int64_t ph = 0; ph < hp; ++ph) {
    const scalar_t* row0 = yp + ph * k * wc;
    scalar_t* orow = op + ph * wp;
    int64_t* irow = ip + ph * wp;
    const int64_t first_row = ph * k * wc;
    for (int64_t pw = 0; pw < wp; ++pw) {
      const scalar_t* win = row0 + pw * k;
      acc_t best = static_cast<acc_t>(win[0]);
      int64_t code = 0;  // r * wc + c of the winner
      for (int64_t r = 0; r < k; ++r) {
        for (int64_t c = (r == 0 ? 1 : 0); c < k; ++c) {
          const acc_t v = static_cast<acc_t>(win[r * wc + c]);
          const bool take = (v > best) | (v != v);
          best = take ? v : best;
          code = take ? r * wc + c : code;
        }
      }
      orow[pw] = static_cast<scalar_t>(best);
      irow[pw] = first_row + pw * k + code;
    }
  }
}

template <typename scalar_t, int K>
struct Entry {
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void avx512(
      const scalar_t* y, scalar_t* out, int64_t* idx, int64_t p0, int64_t p1, int64_t hc, int64_t wc, int64_t k) {
    const int64_t hp = hc / k, wp = wc / k;
    for (int64_t p = p0; p < p1; ++p)
      plane<scalar_t, K>(y + p * hc * wc, out + p * hp * wp, idx + p * hp * wp, hc, wc, k);
  }
  __attribute__((target("avx2,fma"))) static void avx2(const scalar_t* y, scalar_t* out, int64_t* idx, int64_t p0,
                                                        int64_t p1, int64_t hc, int64_t wc, int64_t k) {
    const int64_t hp = hc / k, wp = wc / k;
    for (int64_t p = p0; p < p1; ++p)
      plane<scalar_t, K>(y + p * hc * wc, out + p * hp * wp, idx + p * hp * wp, hc, wc, k);
  }
  static void generic(const scalar_t* y, scalar_t* out, int64_t* idx, int64_t p0, int64_t p1, int64_t hc,
                      int64_t wc, int64_t k) {
    const int64_t hp = hc / k, wp = wc / k;
    for (int64_t p = p0; p < p1; ++p)
      plane<scalar_t, K>(y + p * hc * wc, out + p * hp * wp, idx + p * hp * wp, hc, wc, k);
  }
};

inline int isa() {
  static const int level = [] {
    __builtin_cpu_init();
    int l = 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      l = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      l = 1;
    // EP_KERNELS_ISA=avx2|generic caps the level (tests of the other paths)
    const char* env = std::getenv("EP_KERNELS_ISA");
    if (env != nullptr && std::strcmp(env, "generic") == 0) l = 0;
    if (env != nullptr && std::strcmp(env, "avx2") == 0) l = std::min(l, 1);
    return l;
  }();
  return level;
}

template <typename scalar_t, int K>
void run_k(const scalar_t* y, scalar_t* out, int64_t* idx, int64_t planes, int64_t hc, int64_t wc, int64_t k) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, hc * wc));
  const int level = isa();
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    if (level == 2)
      Entry<scalar_t, K>::avx512(y, out, idx, p0, p1, hc, wc, k);
    else if (level == 1)
      Entry<scalar_t, K>::avx2(y, out, idx, p0, p1, hc, wc, k);
    else
      Entry<scalar_t, K>::generic(y, out, idx, p0, p1, hc, wc, k);
  });
}

// y: (planes, hc, wc) contiguous; out, idx: (planes, hc / k, wc / k) contiguous.
template <typename scalar_t>
void run(const scalar_t* y, scalar_t* out, int64_t* idx, int64_t planes, int64_t hc, int64_t wc, int64_t k) {
  if (k == 2)
    run_k<scalar_t, 2>(y, out, idx, planes, hc, wc, k);
  else if (k == 3)
    run_k<scalar_t, 3>(y, out, idx, planes, hc, wc, k);
  else
    run_k<scalar_t, 0>(y, out, idx, planes, hc, wc, k);
}

}  // namespace pool_argmax
}  // namespace ep_kernels
