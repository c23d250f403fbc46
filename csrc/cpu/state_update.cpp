// Fused state update: out = clamp(gain * (drive + top_down + nudge), 0, 1), and the
// max |out - prev| in the same pass (the convergence residual), so a relaxation step
// reads each operand once and writes the state once. NaN propagates to out and to the
// change (a diverging relaxation is detected by the caller).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/sparse_top_down.h"  // Vec, isa_level, EPK_ALWAYS_INLINE

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace ep_kernels {
namespace {

// One chunk [i0, i1): out = clamp(gain * (drive + td + nudge), 0, 1) with NaN kept, and the
// max |out - prev| (NaN if any is NaN). The additions and the multiplication happen in the
// reference's order (bitwise equal results). Branch-free: the clamp and the NaN-aware max are
// selects, so the loop vectorizes (GCC vectors of the entry point's native width, always_inline
// into per-ISA entry points).
template <typename T, bool TD, bool NU, bool PR, int VB>
EPK_ALWAYS_INLINE T chunk_vec(const T* drive, const T* td, const T* nudge, const T* prev, T* out, int64_t i0,
                              int64_t i1, T gain) {
  using V = typename sparse_td::Vec<T, VB>::type;  // the ISA's native vector
  constexpr int L = sparse_td::Vec<T, VB>::lanes;
  const V zero = V{} , one = zero + T(1);
  V m = zero;
  using M = decltype(zero != zero);  // lane mask (integer vector)
  M nan_seen = M{};
  int64_t i = i0;
  for (; i + L <= i1; i += L) {
    V v, x;
    std::memcpy(&v, drive + i, sizeof(V));
    if constexpr (TD) {
      std::memcpy(&x, td + i, sizeof(V));
      v = v + x;
    }
    if constexpr (NU) {
      std::memcpy(&x, nudge + i, sizeof(V));
      v = v + x;
    }
    v = v * gain;
    // clamp(v, 0, 1), NaN kept (both comparisons are false for NaN)
    v = v < zero ? zero : v;
    v = v > one ? one : v;
    std::memcpy(out + i, &v, sizeof(V));
    if constexpr (PR) {
      std::memcpy(&x, prev + i, sizeof(V));
      V dd = v - x;
      dd = dd < zero ? -dd : dd;
      m = dd > m ? dd : m;
      nan_seen |= (dd != dd);
    }
  }
  T r = T(0);
  if constexpr (PR) {
    bool any_nan = false;
    for (int l = 0; l < L; ++l) {
      r = m[l] > r ? m[l] : r;
      any_nan = any_nan || nan_seen[l] != 0;
    }
    if (any_nan) r = std::numeric_limits<T>::quiet_NaN();
  }
  for (; i < i1; ++i) {
    T v = drive[i];
    if constexpr (TD) v = v + td[i];
    if constexpr (NU) v = v + nudge[i];
    v = v * gain;
    v = v < T(0) ? T(0) : v;
    v = v > T(1) ? T(1) : v;
    out[i] = v;
    if constexpr (PR) {
      T dd = std::abs(v - prev[i]);
      if (r == r) r = (dd > r) | (dd != dd) ? dd : r;
    }
  }
  return r;
}

template <typename T, bool TD, bool NU, bool PR>
struct Entry {
  __attribute__((target("avx512f,avx512dq"))) static T avx512(const T* d, const T* t, const T* g, const T* p, T* o,
                                                              int64_t i0, int64_t i1, T gain) {
    return chunk_vec<T, TD, NU, PR, 64>(d, t, g, p, o, i0, i1, gain);
  }
  __attribute__((target("avx2,fma"))) static T avx2(const T* d, const T* t, const T* g, const T* p, T* o,
                                                     int64_t i0, int64_t i1, T gain) {
    return chunk_vec<T, TD, NU, PR, 32>(d, t, g, p, o, i0, i1, gain);
  }
  static T generic(const T* d, const T* t, const T* g, const T* p, T* o, int64_t i0, int64_t i1, T gain) {
    return chunk_vec<T, TD, NU, PR, 16>(d, t, g, p, o, i0, i1, gain);
  }
};

// bfloat16 / float16: plain loop in float (opmath), rounding once at the store.
template <typename scalar_t, typename acc_t>
acc_t chunk_scalar(const scalar_t* drive, const scalar_t* td, const scalar_t* nudge, const scalar_t* prev,
                   scalar_t* out, int64_t i0, int64_t i1, acc_t gain) {
  acc_t m = 0;
  for (int64_t i = i0; i < i1; ++i) {
    acc_t v = static_cast<acc_t>(drive[i]);
    if (td) v += static_cast<acc_t>(td[i]);
    if (nudge) v += static_cast<acc_t>(nudge[i]);
    v *= gain;
    acc_t s = std::isnan(v) ? v : std::min(std::max(v, acc_t(0)), acc_t(1));
    out[i] = static_cast<scalar_t>(s);
    if (prev) {
      acc_t d = std::abs(static_cast<acc_t>(out[i]) - static_cast<acc_t>(prev[i]));
      if (std::isnan(d) || std::isnan(m)) {
        m = std::numeric_limits<acc_t>::quiet_NaN();
      } else {
        m = std::max(m, d);
      }
    }
  }
  return m;
}

template <typename T, bool TD, bool NU, bool PR>
T run_chunk_vec(const T* d, const T* t, const T* g, const T* p, T* o, int64_t i0, int64_t i1, T gain) {
  const int level = sparse_td::isa_level();
  if (level == 2) return Entry<T, TD, NU, PR>::avx512(d, t, g, p, o, i0, i1, gain);
  if (level == 1) return Entry<T, TD, NU, PR>::avx2(d, t, g, p, o, i0, i1, gain);
  return Entry<T, TD, NU, PR>::generic(d, t, g, p, o, i0, i1, gain);
}

template <typename T>
T run_chunk(const T* d, const T* t, const T* g, const T* p, T* o, int64_t i0, int64_t i1, T gain) {
  const int key = (t ? 4 : 0) | (g ? 2 : 0) | (p ? 1 : 0);
  switch (key) {
    case 0: return run_chunk_vec<T, false, false, false>(d, t, g, p, o, i0, i1, gain);
    case 1: return run_chunk_vec<T, false, false, true>(d, t, g, p, o, i0, i1, gain);
    case 2: return run_chunk_vec<T, false, true, false>(d, t, g, p, o, i0, i1, gain);
    case 3: return run_chunk_vec<T, false, true, true>(d, t, g, p, o, i0, i1, gain);
    case 4: return run_chunk_vec<T, true, false, false>(d, t, g, p, o, i0, i1, gain);
    case 5: return run_chunk_vec<T, true, false, true>(d, t, g, p, o, i0, i1, gain);
    case 6: return run_chunk_vec<T, true, true, false>(d, t, g, p, o, i0, i1, gain);
    default: return run_chunk_vec<T, true, true, true>(d, t, g, p, o, i0, i1, gain);
  }
}

template <typename scalar_t, typename acc_t>
acc_t state_update_loop(const scalar_t* drive, const scalar_t* td, const scalar_t* nudge,
                        const scalar_t* prev, scalar_t* out, int64_t n, acc_t gain) {
  // Per-chunk maxima, then a serial max: deterministic and race-free.
  const int64_t grain = 1 << 14;
  const int64_t nchunks = std::max<int64_t>(1, (n + grain - 1) / grain);
  std::vector<acc_t> chunk_max(nchunks, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * grain, i1 = std::min(n, i0 + grain);
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        chunk_max[c] = run_chunk<scalar_t>(drive, td, nudge, prev, out, i0, i1, gain);
      } else {
        chunk_max[c] = chunk_scalar<scalar_t, acc_t>(drive, td, nudge, prev, out, i0, i1, gain);
      }
    }
  });
  acc_t m = 0;
  for (acc_t v : chunk_max) {
    if (std::isnan(v)) return v;
    m = std::max(m, v);
  }
  return m;
}

at::Tensor state_update_cpu(const at::Tensor& drive, const c10::optional<at::Tensor>& top_down,
                            const c10::optional<at::Tensor>& nudge,
                            const c10::optional<at::Tensor>& prev, double gain, at::Tensor& out) {
  checks::state_update(drive, top_down, nudge, prev, gain, out);
  checks::on_device_type("state_update", drive, "drive", c10::DeviceType::CPU);
  auto contiguous = [](const c10::optional<at::Tensor>& v) { return checks::present(v) ? v->contiguous() : at::Tensor(); };
  const at::Tensor d = drive.contiguous(), t = contiguous(top_down), g = contiguous(nudge), p = contiguous(prev);
  // A non-contiguous out is computed in a temporary and copied back.
  at::Tensor o = out.is_contiguous() ? out : at::empty_like(d);
  const int64_t n = d.numel();
  at::Tensor change;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, d.scalar_type(), "state_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t m = state_update_loop<scalar_t, acc_t>(
        d.const_data_ptr<scalar_t>(), t.defined() ? t.const_data_ptr<scalar_t>() : nullptr,
        g.defined() ? g.const_data_ptr<scalar_t>() : nullptr,
        p.defined() ? p.const_data_ptr<scalar_t>() : nullptr, o.mutable_data_ptr<scalar_t>(), n,
        static_cast<acc_t>(gain));
    change = p.defined() ? at::scalar_tensor(m, d.options()) : at::empty({0}, d.options());
  });
  if (!o.is_same(out)) out.copy_(o);
  return change;
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) { m.impl("state_update", &state_update_cpu); }

}  // namespace ep_kernels
