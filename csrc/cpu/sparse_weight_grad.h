// Sparse contrastive weight-gradient through a max-pool:
//
//   dW = sum_n [ dPhi/dW(x_a, s_a) - dPhi/dW(x_b, s_b) ],
//   dPhi/dW(x, s)[c, ci, ky, kx] = sum_p s[n, c, p] * x[n, ci, oy(a) * sy - py + ky * dy,
//                                                         ox(a) * sx - px + kx * dx]
//
// where a = idx[n, c, p] is the argmax position of window p: the convolution weight-gradient
// with output-gradient U(s), which is non-zero at 1/k^2 of the positions. Both states in one
// pass (s_b enters with its sign flipped).
//
//   1. x_a and x_b are copied once into zero-padded channels-last buffers, chunk-major:
//      [group][chunk of CW input channels][n][hpad][wpad][CW] (CW: one or two 64-byte vectors,
//      zero-filled past the last channel), so a (pixel, chunk) is one or two aligned vectors,
//      the taps need no bounds checks, and a 3x3 tap's offset is a compile-time constant plus
//      a row stride.
//   2. A task per (group, input-channel chunk, image group) owns its slice of a partial dW
//      (no races, no atomics). For a block of images whose x chunks fit in L1 and each output
//      channel c, the accumulators dW[c, chunk, taps] (up to 9 taps x CW, in registers) gather
//      v * x[chunk] at each tap around the argmax position of every non-zero s[n, c, p].
//      Exact zeros of s are skipped; NaN propagates.
//   3. The partials are summed in a fixed order (the number of image groups depends only on
//      the shapes, so the result does not depend on the thread count) and added, times
//      scale, into grad_weight.
//
// Any kernel size, stride, padding, dilation, groups. Indices must lie inside their windows
// (checked; nothing is written on error).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparse_top_down.h"  // Vec, Taps, make_taps, isa_level, Geometry

namespace ep_kernels {
namespace sparse_wg {

using sparse_td::Geometry;
using sparse_td::Taps;
using sparse_td::Vec;

struct Layout {
  int64_t hpad, wpad;   // padded input plane
  int64_t img;          // elements per padded image chunk: hpad * wpad * cw
  int64_t ng;           // image groups (partials)
  int64_t nb;           // images per cache block
  int64_t part;         // elements of one partial dW: groups * nq * cog * khkw * cw
};

// acc[TG][NV] += sum over the windows of channel c of the images [n0, n1) of both states.
// GRID3: the group is the whole 3x3 kernel with dilation 1 (tap offsets ky * row + kx * CW,
// constants but for the row stride); else tap offsets come from toff.
template <typename T, int NV, int TG, bool GRID3, int VB>
EPK_ALWAYS_INLINE bool channel_group(const Geometry& g, const Layout& lay, const int32_t* row_of, const T* const* s,
                                     const int64_t* const* idx, const T* const* xq, int64_t c, int64_t n0,
                                     int64_t n1, const int64_t* toff, T* dst) {
  using V = typename Vec<T, VB>::type;      // the ISA's native vector
  constexpr int L = Vec<T, VB>::lanes;
  constexpr int CW = NV * Vec<T>::lanes;     // layout: NV 64-byte vectors per chunk
  constexpr int NU = CW / L;
  V acc[TG][NU];
  for (int i = 0; i < TG; ++i)
    for (int u = 0; u < NU; ++u) std::memcpy(&acc[i][u], dst + i * CW + u * L, sizeof(V));
  const int64_t p_n = g.hp * g.wp, hcwc = g.hc * g.wc;
  const int64_t row = lay.wpad * CW, ystep = g.sy * row, xstep = g.sx * CW;
  bool ok = true;
  for (int st = 0; st < 2; ++st) {
    const T sign = st == 0 ? T(1) : T(-1);
    for (int64_t n = n0; n < n1; ++n) {
      const T* sv = s[st] + (n * g.c_out + c) * p_n;
      const int64_t* iv = idx[st] + (n * g.c_out + c) * p_n;
      const T* xn = xq[st] + n * lay.img;
      for (int64_t ph = 0; ph < g.hp; ++ph) {
        for (int64_t pw = 0; pw < g.wp; ++pw) {
          const int64_t p = ph * g.wp + pw;
          const T v0 = sv[p];
          if (v0 == T(0)) continue;
          const int64_t a = iv[p];
          const bool in_plane = static_cast<uint64_t>(a) < static_cast<uint64_t>(hcwc);
          const int64_t ay = row_of[in_plane ? a : 0], ax = a - ay * g.wc;
          const bool inside = in_plane & (static_cast<uint64_t>(ay - ph * g.k) < static_cast<uint64_t>(g.k)) &
                              (static_cast<uint64_t>(ax - pw * g.k) < static_cast<uint64_t>(g.k));
          if (C10_UNLIKELY(!inside)) {
            ok = false;
            continue;
          }
          const T v = sign * v0;
          const T* base = xn + ay * ystep + ax * xstep;
          if constexpr (GRID3) {
            for (int ky = 0; ky < 3; ++ky) {
              const T* r = base + ky * row;
              for (int kx = 0; kx < 3; ++kx)
                for (int u = 0; u < NU; ++u) {
                  V xv;
                  std::memcpy(&xv, r + kx * CW + u * L, sizeof(V));
                  acc[ky * 3 + kx][u] += v * xv;
                }
            }
          } else {
            for (int i = 0; i < TG; ++i)
              for (int u = 0; u < NU; ++u) {
                V xv;
                std::memcpy(&xv, base + toff[i] + u * L, sizeof(V));
                acc[i][u] += v * xv;
              }
          }
        }
      }
    }
  }
  for (int i = 0; i < TG; ++i)
    for (int u = 0; u < NU; ++u) std::memcpy(dst + i * CW + u * L, &acc[i][u], sizeof(V));
  return ok;
}

// One task: (group, chunk, image group). Partial layout [grp][q][c][tap][cw].
template <typename T, int NV, int VB>
EPK_ALWAYS_INLINE bool task(const Geometry& g, const Layout& lay, const Taps& taps, const int32_t* row_of,
                            const T* const* s, const int64_t* const* idx, const T* const* xp, T* partials,
                            int64_t t) {
  constexpr int CW = NV * Vec<T>::lanes;
  const int64_t q = t % g.nq;
  const int64_t grp = (t / g.nq) % g.groups;
  const int64_t ig = t / (g.nq * g.groups);
  const int64_t khkw = g.kh * g.kw;
  const int64_t per = (g.n + lay.ng - 1) / lay.ng;
  const int64_t i0 = ig * per, i1 = std::min(g.n, i0 + per);
  T* part = partials + ig * lay.part + (grp * g.nq + q) * g.cog * khkw * CW;
  const T* xq[2] = {xp[0] + (grp * g.nq + q) * g.n * lay.img, xp[1] + (grp * g.nq + q) * g.n * lay.img};
  bool ok = true;
  const bool grid3 = g.kh == 3 && g.kw == 3 && g.dy == 1 && g.dx == 1 && sparse_td::max_tap_group() >= 9;
  const int ngroups = grid3 ? 1 : static_cast<int>(taps.group_size.size());
  for (int64_t nb0 = i0; nb0 < i1; nb0 += lay.nb) {
    const int64_t nb1 = std::min(i1, nb0 + lay.nb);
    for (int gi = 0; gi < ngroups; ++gi) {
      const int t0 = grid3 ? 0 : taps.group_start[gi], tg = grid3 ? 9 : taps.group_size[gi];
      int64_t toff[9];
      for (int i = 0; i < tg; ++i) {
        const int64_t tap = t0 + i, ky = tap / g.kw, kx = tap % g.kw;
        toff[i] = (ky * g.dy * lay.wpad + kx * g.dx) * CW;
      }
      for (int64_t cl = 0; cl < g.cog; ++cl) {
        const int64_t c = grp * g.cog + cl;
        T* dst = part + (cl * khkw + t0) * CW;
        bool r;
        if (grid3) {
          r = channel_group<T, NV, 9, true, VB>(g, lay, row_of, s, idx, xq, c, nb0, nb1, toff, dst);
        } else {
          switch (tg) {
            case 9: r = channel_group<T, NV, 9, false, VB>(g, lay, row_of, s, idx, xq, c, nb0, nb1, toff, dst); break;
            case 6: r = channel_group<T, NV, 6, false, VB>(g, lay, row_of, s, idx, xq, c, nb0, nb1, toff, dst); break;
            case 4: r = channel_group<T, NV, 4, false, VB>(g, lay, row_of, s, idx, xq, c, nb0, nb1, toff, dst); break;
            case 3: r = channel_group<T, NV, 3, false, VB>(g, lay, row_of, s, idx, xq, c, nb0, nb1, toff, dst); break;
            case 2: r = channel_group<T, NV, 2, false, VB>(g, lay, row_of, s, idx, xq, c, nb0, nb1, toff, dst); break;
            default: r = channel_group<T, NV, 1, false, VB>(g, lay, row_of, s, idx, xq, c, nb0, nb1, toff, dst); break;
          }
        }
        ok = ok && r;
      }
    }
  }
  return ok;
}

template <typename T, int NV>
struct Runner {
  __attribute__((target("avx512f"))) static bool avx512(const Geometry& g, const Layout& lay, const Taps& taps,
                                                         const int32_t* row_of, const T* const* s,
                                                         const int64_t* const* idx, const T* const* xp, T* partials,
                                                         int64_t t0, int64_t t1) {
    bool ok = true;
    for (int64_t t = t0; t < t1; ++t) ok = task<T, NV, 64>(g, lay, taps, row_of, s, idx, xp, partials, t) && ok;
    return ok;
  }
  __attribute__((target("avx2,fma"))) static bool avx2(const Geometry& g, const Layout& lay, const Taps& taps,
                                                        const int32_t* row_of, const T* const* s,
                                                        const int64_t* const* idx, const T* const* xp, T* partials,
                                                        int64_t t0, int64_t t1) {
    bool ok = true;
    for (int64_t t = t0; t < t1; ++t) ok = task<T, NV, 32>(g, lay, taps, row_of, s, idx, xp, partials, t) && ok;
    return ok;
  }
  static bool generic(const Geometry& g, const Layout& lay, const Taps& taps, const int32_t* row_of,
                      const T* const* s, const int64_t* const* idx, const T* const* xp, T* partials, int64_t t0,
                      int64_t t1) {
    bool ok = true;
    for (int64_t t = t0; t < t1; ++t) ok = task<T, NV, 16>(g, lay, taps, row_of, s, idx, xp, partials, t) && ok;
    return ok;
  }
};

// Zero-padded channels-last, chunk-major copy of x (N, C_in, H, W):
// xp[grp][q][n][hpad][wpad][cw].
template <typename T>
void pad_channels_last(const Geometry& g, const Layout& lay, const T* x, T* xp) {
  const int64_t hmax = std::min(g.h, lay.hpad - g.py), wmax = std::min(g.w, lay.wpad - g.px);
  at::parallel_for(0, g.groups * g.nq * g.n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r % g.n, q = (r / g.n) % g.nq, grp = r / (g.n * g.nq);
      T* dst = xp + r * lay.img;
      std::fill(dst, dst + lay.img, T(0));
      const int64_t cn = std::min<int64_t>(g.cw, g.cig - q * g.cw);
      for (int64_t j = 0; j < cn; ++j) {
        const T* src = x + ((n * g.groups + grp) * g.cig + q * g.cw + j) * g.h * g.w;
        for (int64_t iy = 0; iy < hmax; ++iy) {
          T* d = dst + ((iy + g.py) * lay.wpad + g.px) * g.cw + j;
          const T* sr = src + iy * g.w;
          for (int64_t ix = 0; ix < wmax; ++ix) d[ix * g.cw] = sr[ix];
        }
      }
    }
  });
}

// Channel-chunk width of the layout for T: one 64-byte vector of input channels, or two.
template <typename T>
int64_t chunk_width_wg(int64_t cig) {
  constexpr int L = Vec<T>::lanes;
  return (cig <= L ? 1 : 2) * L;
}

// Whether the sparse kernel's padded copy of x is reasonable for this geometry. The copy
// covers the region the convolution reads, hpad x wpad per image and channel chunk: for the
// usual geometries about x's size, but legal extreme strides, paddings or dilations (up to
// 2^31 - 1 each) can make it astronomically large or overflow int64. The sparse path is then
// not taken (a fixed rule on the geometry): ATen's dense weight-gradient handles any geometry.
// Every product is overflow-checked.
template <typename T>
bool padded_copy_fits(const Geometry& g) {
  const int64_t cw = chunk_width_wg<T>(g.cig), nq = (g.cig + cw - 1) / cw;
  int64_t hpad, wpad, t, total;
  const bool overflow =
      __builtin_mul_overflow(g.hc - 1, g.sy, &hpad) || __builtin_mul_overflow(g.kh - 1, g.dy, &t) ||
      __builtin_add_overflow(hpad, t + 1, &hpad) || __builtin_mul_overflow(g.wc - 1, g.sx, &wpad) ||
      __builtin_mul_overflow(g.kw - 1, g.dx, &t) || __builtin_add_overflow(wpad, t + 1, &wpad) ||
      __builtin_mul_overflow(hpad, wpad, &total) || __builtin_mul_overflow(total, cw, &total) ||
      __builtin_mul_overflow(total, g.groups * nq * g.n, &total);
  const int64_t x_elems = g.n * g.c_in * g.h * g.w;
  return !overflow && total <= std::max<int64_t>(16 * x_elems, int64_t(1) << 22);
}

// Returns false (and writes nothing) if an index is outside its window.
template <typename T>
bool accumulate(const Geometry& g0, const at::Tensor& x_a, const at::Tensor& s_a, const at::Tensor& idx_a,
                const at::Tensor& x_b, const at::Tensor& s_b, const at::Tensor& idx_b, double scale,
                at::Tensor& grad_weight) {
  Geometry g = g0;
  constexpr int L = Vec<T>::lanes;
  g.cw = chunk_width_wg<T>(g.cig);
  const int64_t nv = g.cw / L;
  g.nq = (g.cig + g.cw - 1) / g.cw;
  const int64_t khkw = g.kh * g.kw;
  Layout lay{};
  lay.hpad = (g.hc - 1) * g.sy + (g.kh - 1) * g.dy + 1;
  lay.wpad = (g.wc - 1) * g.sx + (g.kw - 1) * g.dx + 1;
  lay.img = lay.hpad * lay.wpad * g.cw;
  // enough tasks for the threads without image groups when there are many chunks; the count
  // depends only on the shapes (deterministic summation order)
  const int64_t chunks = g.groups * g.nq;
  lay.ng = chunks >= 4 ? 1 : std::min<int64_t>(g.n, (8 + chunks - 1) / chunks);
  lay.ng = std::max<int64_t>(lay.ng, 1);
  const int64_t chunk_bytes = lay.img * static_cast<int64_t>(sizeof(T));
  lay.nb = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, chunk_bytes));
  lay.part = g.groups * g.nq * g.cog * khkw * g.cw;

  auto opts = x_a.options();
  auto xa_c = x_a.contiguous(), xb_c = x_b.contiguous();
  auto sa = s_a.contiguous(), sb = s_b.contiguous();
  auto ia = idx_a.contiguous(), ib = idx_b.contiguous();
  auto xpad = at::empty({2, g.groups * g.nq * g.n * lay.img}, opts);
  pad_channels_last<T>(g, lay, xa_c.const_data_ptr<T>(), xpad[0].mutable_data_ptr<T>());
  pad_channels_last<T>(g, lay, xb_c.const_data_ptr<T>(), xpad[1].mutable_data_ptr<T>());
  auto partials = at::zeros({lay.ng * lay.part}, opts);
  std::vector<int32_t> row_of(g.hc * g.wc);
  for (int64_t a = 0; a < g.hc * g.wc; ++a) row_of[a] = static_cast<int32_t>(a / g.wc);
  const Taps taps = sparse_td::make_taps(g);
  const T* s_ptr[2] = {sa.const_data_ptr<T>(), sb.const_data_ptr<T>()};
  const int64_t* i_ptr[2] = {ia.const_data_ptr<int64_t>(), ib.const_data_ptr<int64_t>()};
  const T* x_ptr[2] = {xpad[0].const_data_ptr<T>(), xpad[1].const_data_ptr<T>()};
  T* part = partials.mutable_data_ptr<T>();
  std::atomic<bool> ok{true};
  const int isa = sparse_td::isa_level();
  const int64_t ntasks = chunks * lay.ng;
  auto go = [&](auto nv_c) {
    constexpr int NV = decltype(nv_c)::value;
    at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
      bool r;
      if (isa == 2)
        r = Runner<T, NV>::avx512(g, lay, taps, row_of.data(), s_ptr, i_ptr, x_ptr, part, t0, t1);
      else if (isa == 1)
        r = Runner<T, NV>::avx2(g, lay, taps, row_of.data(), s_ptr, i_ptr, x_ptr, part, t0, t1);
      else
        r = Runner<T, NV>::generic(g, lay, taps, row_of.data(), s_ptr, i_ptr, x_ptr, part, t0, t1);
      if (!r) ok = false;
    });
  };
  if (nv == 1)
    go(std::integral_constant<int, 1>());
  else
    go(std::integral_constant<int, 2>());
  if (!ok.load()) return false;

  // grad_weight[co, ci, ky, kx] += scale * sum_ig partial[ig][grp][q][c][tap][j]
  auto gw = grad_weight.is_contiguous() ? grad_weight : grad_weight.contiguous();
  T* gwp = gw.mutable_data_ptr<T>();
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, g.c_out, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co) {
      const int64_t grp = co / g.cog, cl = co % g.cog;
      for (int64_t ci = 0; ci < g.cig; ++ci) {
        const int64_t q = ci / g.cw, j = ci % g.cw;
        const T* src = part + (((grp * g.nq + q) * g.cog + cl) * khkw) * g.cw + j;
        T* d = gwp + (co * g.cig + ci) * khkw;
        for (int64_t tap = 0; tap < khkw; ++tap) {
          T sum = T(0);
          for (int64_t ig = 0; ig < lay.ng; ++ig) sum += src[ig * lay.part + tap * g.cw];
          d[tap] += sc * sum;
        }
      }
    }
  });
  if (!gw.is_same(grad_weight)) grad_weight.copy_(gw);
  return true;
}

}  // namespace sparse_wg
}  // namespace ep_kernels
