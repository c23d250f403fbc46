// Sparse top-down through a max-pool: out = W^T * U(s), touching only the argmax positions.
//
// U(s) (the max-unpool of s) has one non-zero per (n, c_out, pooled position): only 1/k^2 of
// the dense transposed convolution's multiply-adds are needed. The non-zeros of different
// output channels sit at different window positions, so this is not one dense GEMM but a
// sparse x dense product; it is computed here as follows.
//
//   1. Per image, a CSR of the non-zeros keyed by (output-channel block, conv-output position
//      o): entries (channel's weight offset, value), in channel order. Exact zeros of s
//      (saturated states) are skipped; NaN is kept, so it propagates.
//   2. W is packed as [input-channel chunk][c_out][ky][kx][CW]: CW input channels of the
//      channel's group (one or two 64-byte vectors, zero past the last) contiguous per
//      (channel, tap). The packing depends only on the weight: it is kept across calls
//      (packed_weight_cache.h).
//   3. A task per (image, group, input-channel chunk) owns its slice of the output (no races,
//      no atomics; the result does not depend on the thread count). For each block of output
//      channels (packed weights ~48 KB, resident in L1) and each conv-output position o, the
//      accumulators of up to 9 taps x CW input channels stay in vector registers while the
//      channels whose argmax is o stream by (one weight load per FMA), then each tap's sum is
//      added into its input pixel of a channels-last buffer. Consecutive tasks of a thread
//      are consecutive images, so the weight chunk stays in L2.
//   4. The buffer (pixels x CW) is transposed into the NCHW output.
//
// Any kernel size, stride, padding, dilation and groups. The indices must be those of a k x k
// max-pool of stride k: each inside its own window (checked: ValueError otherwise).
// Vector code: AVX-512 or AVX2+FMA chosen at run time (GCC vector extensions, always_inline
// into per-ISA entry points), plain code otherwise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ep_kernels {
namespace sparse_td {

#define EPK_ALWAYS_INLINE inline __attribute__((always_inline))

struct Geometry {
  int64_t n, c_out, c_in, groups, cog, cig;  // cog/cig: channels per group
  int64_t h, w;                              // input (= output of this op) spatial size
  int64_t hc, wc;                            // conv-output size
  int64_t hp, wp;                            // pooled size
  int64_t kh, kw, sy, sx, py, px, dy, dx, k;
  int64_t bc;      // output channels per block
  int64_t nblk;    // blocks per group
  int64_t cw;      // input channels per chunk (vector width multiple)
  int64_t nq;      // chunks per group
};

// The shape fields of a Geometry (the blocking fields are set by the kernels). One builder for
// the top-down and the contrastive update, which see the same convolution from two sides.
inline Geometry make_geometry(int64_t n, int64_t c_out, int64_t groups, int64_t cig, int64_t h, int64_t w,
                              at::IntArrayRef conv_out_size, int64_t hp, int64_t wp, int64_t kh, int64_t kw,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t pool) {
  Geometry g{};
  g.n = n;
  g.c_out = c_out;
  g.groups = groups;
  g.cog = c_out / groups;
  g.cig = cig;
  g.c_in = cig * groups;
  g.h = h;
  g.w = w;
  g.hc = conv_out_size[0];
  g.wc = conv_out_size[1];
  g.hp = hp;
  g.wp = wp;
  g.kh = kh;
  g.kw = kw;
  g.sy = stride[0];
  g.sx = stride[1];
  g.py = padding[0];
  g.px = padding[1];
  g.dy = dilation[0];
  g.dx = dilation[1];
  g.k = pool;
  return g;
}

// Kernel taps, split into groups of at most 9 whose accumulators fit in registers.
// tap t = ky * kw + kx reaches input pixel (oy * sy + ty[t], ox * sx + tx[t]).
struct Taps {
  std::vector<int64_t> ty, tx;
  std::vector<int> group_start, group_size;  // sizes from {9, 6, 4, 3, 2, 1}
  int64_t ntaps = 0;
  std::vector<int32_t> pix;  // [o][tap]: input pixel iy * w + ix the tap reaches from o, or -1
};

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline. EP_KERNELS_ISA=avx2|generic caps it (to test the
// other code paths on an AVX-512 machine); it can never raise it above what the CPU has.
inline int isa_cap_from_env() {
  const char* env = std::getenv("EP_KERNELS_ISA");
  if (env == nullptr) return 2;
  if (std::strcmp(env, "generic") == 0) return 0;
  if (std::strcmp(env, "avx2") == 0) return 1;
  return 2;
}

inline int isa_level() {
  static const int level = [] {
    __builtin_cpu_init();
    int l = 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) l = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) l = 1;
    return std::min(l, isa_cap_from_env());
  }();
  return level;
}

// Taps per register-resident group: 9 taps x (1 or 2) zmm accumulators fit the 32 AVX-512
// registers; AVX2 has 16 ymm (a chunk is 2 or 4 of them), the baseline 16 xmm (4 or 8).
inline int max_tap_group() {
  const int l = isa_level();
  return l == 2 ? 9 : (l == 1 ? 3 : 1);
}

inline Taps make_taps(const Geometry& g) {
  Taps t;
  for (int64_t ky = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      t.ty.push_back(ky * g.dy - g.py);
      t.tx.push_back(kx * g.dx - g.px);
    }
  int left = static_cast<int>(g.kh * g.kw), start = 0;
  const int cap = max_tap_group();
  while (left > 0) {
    int sz = 1;
    for (int c : {9, 6, 4, 3, 2, 1})
      if (c <= left && c <= cap) {
        sz = c;
        break;
      }
    t.group_start.push_back(start);
    t.group_size.push_back(sz);
    start += sz;
    left -= sz;
  }
  t.ntaps = g.kh * g.kw;
  t.pix.resize(g.hc * g.wc * t.ntaps);
  for (int64_t oy = 0; oy < g.hc; ++oy)
    for (int64_t ox = 0; ox < g.wc; ++ox)
      for (int64_t i = 0; i < t.ntaps; ++i) {
        const int64_t iy = oy * g.sy + t.ty[i], ix = ox * g.sx + t.tx[i];
        t.pix[(oy * g.wc + ox) * t.ntaps + i] =
            (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) ? static_cast<int32_t>(iy * g.w + ix) : -1;
      }
  return t;
}

// VB-byte vector of T (GCC vector extension). The kernels are always_inline into per-ISA entry
// points and use the entry point's native width (64 bytes: zmm, 32: ymm, 16: xmm); wider
// generic vectors would be split and spilled. The data layouts are in 64-byte units whatever
// the ISA, so packings do not depend on it.
template <typename T, int VB = 64>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int lanes = VB / sizeof(T);
};

// One conv-output position o and a group of TG taps: the TG x NV accumulators stay in
// registers while the channels whose argmax is o stream by (TG * NV FMAs per channel, one
// weight load each), then each tap's sum is added into its input pixel of the buffer.
template <typename T, int NV, int TG, int VB>
EPK_ALWAYS_INLINE void o_group(const int32_t* ew, const T* ev, int32_t e0, int32_t e1, const T* wbase,
                               T* buf, const int32_t* pix) {
  using V = typename Vec<T, VB>::type;      // the ISA's native vector
  constexpr int L = Vec<T, VB>::lanes;
  constexpr int CW = NV * Vec<T>::lanes;     // layout: NV 64-byte vectors per tap
  constexpr int NU = CW / L;                 // native vectors per tap
  V acc[TG][NU];
  for (int i = 0; i < TG; ++i)
    for (int u = 0; u < NU; ++u) acc[i][u] = V{};
  for (int32_t e = e0; e < e1; ++e) {
    const T v = ev[e];
    const T* wp = wbase + ew[e];
    for (int i = 0; i < TG; ++i)
      for (int u = 0; u < NU; ++u) {
        V wv;
        std::memcpy(&wv, wp + i * CW + u * L, sizeof(V));
        acc[i][u] += v * wv;
      }
  }
  for (int i = 0; i < TG; ++i) {
    if (pix[i] < 0) continue;
    T* bp = buf + pix[i] * CW;
    for (int u = 0; u < NU; ++u) {
      V b;
      std::memcpy(&b, bp + u * L, sizeof(V));
      b += acc[i][u];
      std::memcpy(bp + u * L, &b, sizeof(V));
    }
  }
}

template <typename T, int NV, int VB>
EPK_ALWAYS_INLINE void task(const Geometry& g, const Taps& taps, const int32_t* offs, const int32_t* ent_w,
                            const T* ent_v, const T* wpk, T* buf, T* out, int64_t t) {
  constexpr int CW = NV * Vec<T>::lanes;
  // image fastest: consecutive tasks of a thread share their weight chunk (kept in L2)
  const int64_t n = t % g.n;
  const int64_t grp = (t / g.n) % g.groups;
  const int64_t q = t / (g.n * g.groups);
  const int64_t hcwc = g.hc * g.wc, khkw = g.kh * g.kw, hw = g.h * g.w;
  const T* wchunk = wpk + (q * g.c_out + grp * g.cog) * khkw * CW;
  const int32_t* offs_n = offs + n * (g.groups * g.nblk * hcwc + 2);
  ent_w += n * g.c_out * g.hp * g.wp;  // entries are indexed from their image's base
  ent_v += n * g.c_out * g.hp * g.wp;
  std::memset(buf, 0, sizeof(T) * hw * CW);
  const int ngroups = static_cast<int>(taps.group_size.size());

  for (int64_t b = 0; b < g.nblk; ++b) {
    const int32_t* of = offs_n + (grp * g.nblk + b) * hcwc;
    for (int64_t oy = 0; oy < g.hc; ++oy) {
      for (int64_t ox = 0; ox < g.wc; ++ox) {
        const int64_t o = oy * g.wc + ox;
        const int32_t e0 = of[o], e1 = of[o + 1];
        if (e0 == e1) continue;
        for (int gi = 0; gi < ngroups; ++gi) {
          const int t0 = taps.group_start[gi], tg = taps.group_size[gi];
          const int32_t* pix = taps.pix.data() + o * taps.ntaps + t0;
          const T* wb = wchunk + t0 * CW;
          switch (tg) {
            case 9: o_group<T, NV, 9, VB>(ent_w, ent_v, e0, e1, wb, buf, pix); break;
            case 6: o_group<T, NV, 6, VB>(ent_w, ent_v, e0, e1, wb, buf, pix); break;
            case 4: o_group<T, NV, 4, VB>(ent_w, ent_v, e0, e1, wb, buf, pix); break;
            case 3: o_group<T, NV, 3, VB>(ent_w, ent_v, e0, e1, wb, buf, pix); break;
            case 2: o_group<T, NV, 2, VB>(ent_w, ent_v, e0, e1, wb, buf, pix); break;
            default: o_group<T, NV, 1, VB>(ent_w, ent_v, e0, e1, wb, buf, pix); break;
          }
        }
      }
    }
  }
  // channels-last buffer -> NCHW output slice
  const int64_t c0 = q * CW, cn = std::min<int64_t>(CW, g.cig - c0);
  T* outp = out + (n * g.c_in + grp * g.cig + c0) * hw;
  for (int64_t j = 0; j < cn; ++j) {
    T* o = outp + j * hw;
    const T* src = buf + j;
    for (int64_t p = 0; p < hw; ++p) o[p] = src[p * CW];
  }
}

template <typename T, int NV>
struct Runner {
  __attribute__((target("avx512f"))) static void avx512(const Geometry& g, const Taps& taps, const int32_t* offs,
                                                         const int32_t* ent_w, const T* ent_v, const T* wpk,
                                                         T* buf, T* out, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) task<T, NV, 64>(g, taps, offs, ent_w, ent_v, wpk, buf, out, t);
  }
  __attribute__((target("avx2,fma"))) static void avx2(const Geometry& g, const Taps& taps, const int32_t* offs,
                                                        const int32_t* ent_w, const T* ent_v, const T* wpk,
                                                        T* buf, T* out, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) task<T, NV, 32>(g, taps, offs, ent_w, ent_v, wpk, buf, out, t);
  }
  static void generic(const Geometry& g, const Taps& taps, const int32_t* offs, const int32_t* ent_w, const T* ent_v, const T* wpk,
                      T* buf, T* out, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) task<T, NV, 16>(g, taps, offs, ent_w, ent_v, wpk, buf, out, t);
  }
};

// Build the per-image CSR: offs[n][key] (key = (group * nblk + block) * hcwc + o; the skipped
// entries are stored after all real ones), entries (weight offset, value) in channel
// order within a key. Branch-free (zeros of s and the argmax positions are random: branches on
// them would mispredict). Returns false if an index lies outside its pooling window.
template <typename T>
bool build_csr(const Geometry& g, const T* s, const int64_t* idx, int32_t* offs, int32_t* ent_w, T* ent_v,
               int64_t* bad_at) {
  const int64_t p_n = g.hp * g.wp, hcwc = g.hc * g.wc, khkw = g.kh * g.kw;
  const int64_t nkeys = g.groups * g.nblk * hcwc;
  std::atomic<bool> ok{true};
  std::atomic<int64_t> bad{-1};
  std::vector<int32_t> row_of(hcwc);  // conv-output row of each flat position
  for (int64_t a = 0; a < hcwc; ++a) row_of[a] = static_cast<int32_t>(a / g.wc);
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    std::vector<int32_t> key(g.c_out * p_n);
    std::vector<int32_t> pos(nkeys + 1);
    for (int64_t n = n0; n < n1; ++n) {
      int32_t* of = offs + n * (nkeys + 2);
      std::fill(of, of + nkeys + 2, 0);
      const T* sn = s + n * g.c_out * p_n;
      const int64_t* in = idx + n * g.c_out * p_n;
      bool all_inside = true;
      // keys and counts (count of key k at of[k + 1])
      for (int64_t c = 0; c < g.c_out; ++c) {
        const int64_t grp = c / g.cog, cl = c % g.cog, blk = cl / g.bc;
        const int32_t kbase = static_cast<int32_t>((grp * g.nblk + blk) * hcwc);
        for (int64_t ph = 0; ph < g.hp; ++ph) {
          for (int64_t pw = 0; pw < g.wp; ++pw) {
            const int64_t e = c * p_n + ph * g.wp + pw;
            const int64_t a = in[e];
            const bool in_plane = static_cast<uint64_t>(a) < static_cast<uint64_t>(hcwc);
            const int64_t ac = in_plane ? a : 0;
            const int64_t ay = row_of[ac], ax = ac - ay * g.wc;
            const bool inside = in_plane & (static_cast<uint64_t>(ay - ph * g.k) < static_cast<uint64_t>(g.k)) &
                                (static_cast<uint64_t>(ax - pw * g.k) < static_cast<uint64_t>(g.k));
            all_inside &= inside;
            // exact zeros contribute nothing (NaN != 0, so NaN is kept)
            const bool keep = inside & (sn[e] != T(0));
            const int32_t k = kbase + static_cast<int32_t>(ac);
            key[e] = keep ? k : ~k;  // negative: skipped (counted apart, no hot counter)
            of[k + 1] += static_cast<int32_t>(keep);
          }
        }
      }
      if (C10_UNLIKELY(!all_inside)) {
        ok = false;
        for (int64_t e = 0; e < g.c_out * p_n; ++e) {
          const int64_t a = in[e], p = e % p_n, ph = p / g.wp, pw = p % g.wp;
          const bool inside = a >= 0 && a < hcwc && (a / g.wc) / g.k == ph && (a % g.wc) / g.k == pw;
          if (!inside) {
            bad = n * g.c_out * p_n + e;
            break;
          }
        }
        continue;
      }
      for (int64_t k = 0; k < nkeys; ++k) of[k + 1] += of[k];
      of[nkeys + 1] = static_cast<int32_t>(g.c_out * p_n);  // skipped entries go after the real ones
      std::copy(of, of + nkeys + 1, pos.begin());
      int32_t trash = of[nkeys];
      int32_t* ew = ent_w + n * g.c_out * p_n;
      T* ev = ent_v + n * g.c_out * p_n;
      for (int64_t c = 0; c < g.c_out; ++c) {
        const int32_t woff = static_cast<int32_t>((c % g.cog) * khkw * g.cw);
        for (int64_t p = 0; p < p_n; ++p) {
          const int64_t e = c * p_n + p;
          const int32_t kk = key[e];
          const bool keep = kk >= 0;
          const int32_t k = keep ? kk : ~kk;
          const int32_t sr = pos[k];
          const int32_t slot = keep ? sr : trash;
          pos[k] = sr + static_cast<int32_t>(keep);
          trash += static_cast<int32_t>(!keep);
          ew[slot] = woff;
          ev[slot] = sn[e];
        }
      }
    }
  });
  *bad_at = bad.load();
  return ok.load();
}

template <typename T, int NV>
void run_tasks(const Geometry& g, const Taps& taps, const int32_t* offs, const int32_t* ent_w, const T* ent_v, const T* wpk,
               T* out) {
  const int64_t ntasks = g.n * g.groups * g.nq;
  const int isa = isa_level();
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> buf_v(g.h * g.w * g.cw + 64 / sizeof(T));
    // 64-byte aligned start
    T* buf = buf_v.data();
    while (reinterpret_cast<uintptr_t>(buf) % 64) ++buf;
    if (isa == 2)
      Runner<T, NV>::avx512(g, taps, offs, ent_w, ent_v, wpk, buf, out, t0, t1);
    else if (isa == 1)
      Runner<T, NV>::avx2(g, taps, offs, ent_w, ent_v, wpk, buf, out, t0, t1);
    else
      Runner<T, NV>::generic(g, taps, offs, ent_w, ent_v, wpk, buf, out, t0, t1);
  });
}

// Chunk width for a weight with cig input channels per group: one 64-byte vector if they fit,
// else two. Shared by the packing and the kernel (and mirrored by the Python fake kernel).
template <typename T>
int64_t chunk_width(int64_t cig) {
  constexpr int L = Vec<T>::lanes;
  return cig <= L ? L : 2 * L;
}

// Whether the sparse kernel's 32-bit offsets and per-image buffer fit this geometry: input
// pixels times the channel chunk (h * w * cw, the buffer and its int32 offsets) below 2^31.
// Legal input sizes (up to 2^31 - 1 each) can exceed that; the dense path (ATen) is taken then,
// a fixed rule on the geometry. Overflow-checked.
template <typename T>
bool offsets_fit(int64_t h, int64_t w, int64_t cig) {
  int64_t n;
  return !__builtin_mul_overflow(h, w, &n) && !__builtin_mul_overflow(n, chunk_width<T>(cig), &n) &&
         n < (int64_t(1) << 31);
}

// Fill in the blocking of a geometry (output-channel blocks, input-channel chunks) for T.
template <typename T>
void plan(Geometry& g, int64_t block_bytes = 48 * 1024) {
  g.cw = chunk_width<T>(g.cig);
  g.nq = (g.cig + g.cw - 1) / g.cw;
  g.bc = std::max<int64_t>(1, std::min<int64_t>(g.cog, block_bytes / (g.kh * g.kw * g.cw * (int64_t)sizeof(T))));
  g.nblk = (g.cog + g.bc - 1) / g.bc;
}

// Packed weight [q][c_out][kh * kw][cw] of a (C_out, cig, kh, kw) weight.
template <typename T>
at::Tensor pack_weight(const at::Tensor& weight_in) {
  auto weight = weight_in.contiguous();
  const int64_t c_out = weight.size(0), cig = weight.size(1), khkw = weight.size(2) * weight.size(3);
  const int64_t cw = chunk_width<T>(cig), nq = (cig + cw - 1) / cw;
  auto wpk = at::empty({nq * c_out * khkw * cw}, weight.options());
  const T* w = weight.const_data_ptr<T>();
  T* pk = wpk.mutable_data_ptr<T>();
  at::parallel_for(0, nq * c_out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t co = r % c_out, q = r / c_out;
      for (int64_t kk = 0; kk < khkw; ++kk) {
        T* dst = pk + (r * khkw + kk) * cw;
        for (int64_t j = 0; j < cw; ++j) {
          const int64_t ci = q * cw + j;
          dst[j] = ci < cig ? w[(co * cig + ci) * khkw + kk] : T(0);
        }
      }
    }
  });
  return wpk;
}

// s, idx: (N, C_out, Hp, Wp) contiguous; weight (C_out, C_in/groups, kh, kw); packed: its
// packing. Returns out (N, C_in, H, W), or an undefined tensor with *bad_at >= 0
// (flat index into idx) when an index is outside its window.
template <typename T>
at::Tensor top_down(const Geometry& g0, const at::Tensor& s, const at::Tensor& idx, const at::Tensor& weight,
                    const at::Tensor& packed, int64_t* bad_at) {
  Geometry g = g0;
  plan<T>(g);
  const int64_t p_n = g.hp * g.wp, hcwc = g.hc * g.wc, khkw = g.kh * g.kw;
  const int64_t nkeys = g.groups * g.nblk * hcwc;
  TORCH_CHECK(g.c_out * p_n < (int64_t(1) << 31) && nkeys + 2 < (int64_t(1) << 31) &&
                  g.cog * khkw * g.cw < (int64_t(1) << 31),
              "pool_conv_transpose: problem too large for the sparse kernel's 32-bit offsets");
  auto opts = s.options();
  const at::Tensor& wpk = packed;
  const Taps taps = make_taps(g);
  auto offs = at::empty({g.n * (nkeys + 2)}, opts.dtype(at::kInt));
  auto ent_w = at::empty({g.n * g.c_out * p_n}, opts.dtype(at::kInt));
  auto ent_v = at::empty({g.n * g.c_out * p_n}, opts);
  *bad_at = -1;
  if (!build_csr<T>(g, s.const_data_ptr<T>(), idx.const_data_ptr<int64_t>(), offs.mutable_data_ptr<int32_t>(),
                    ent_w.mutable_data_ptr<int32_t>(), ent_v.mutable_data_ptr<T>(), bad_at))
    return at::Tensor();
  auto out = at::empty({g.n, g.c_in, g.h, g.w}, opts);
  const int64_t nv = g.cw / Vec<T>::lanes;
  auto go = [&](auto nv_c) {
    run_tasks<T, decltype(nv_c)::value>(g, taps, offs.const_data_ptr<int32_t>(), ent_w.const_data_ptr<int32_t>(),
                                        ent_v.const_data_ptr<T>(), wpk.const_data_ptr<T>(),
                                        out.mutable_data_ptr<T>());
  };
  if (nv == 1)
    go(std::integral_constant<int, 1>());
  else
    go(std::integral_constant<int, 2>());
  return out;
}

// The whole op for pool > 1, float/double: validated arguments and the packed weight in,
// W^T U(s) out.
inline at::Tensor pool_conv_transpose(const at::Tensor& s_in, const at::Tensor& idx_in, const at::Tensor& weight,
                                      at::IntArrayRef input_size, at::IntArrayRef conv_out_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, int64_t pool, const at::Tensor& packed) {
  auto s = s_in.contiguous();
  auto idx = idx_in.contiguous();
  Geometry g = make_geometry(s.size(0), s.size(1), groups, weight.size(1), input_size[0], input_size[1],
                             conv_out_size, s.size(2), s.size(3), weight.size(2), weight.size(3), stride, padding,
                             dilation, pool);
  int64_t bad = -1;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "sparse_pool_conv_transpose", [&] {
    out = top_down<scalar_t>(g, s, idx, weight, packed, &bad);
  });
  if (bad >= 0) checks::index_outside_window("pool_conv_transpose", "indices", idx, bad, g.hc, g.wc, pool);
  return out;
}

}  // namespace sparse_td
}  // namespace ep_kernels
