// The contract of every op, checked by every kernel (CPU and CUDA) before it touches memory.
//
// The same checks, in the same order and with the same words, as the Python meta functions in
// ep_kernels/ops/_meta.py (the fake kernels and the Python wrappers' checks): a direct
// torch.ops.ep_kernels.<op> call is refused exactly like a call through ep_kernels.ops. A bad
// value or shape is a ValueError (TORCH_CHECK_VALUE), a bad dtype a TypeError
// (TORCH_CHECK_TYPE). Keep the two files in step; tests/test_op_errors.py holds them together.
//
// Geometry: every stride, padding, dilation, pool, group count, kernel and spatial size is
// at most kMaxGeometry = 2^31 - 1, so every product or sum of two of them (the kernels' index
// arithmetic: (k - 1) * dilation + 2 * padding, o * stride + tap, ...) fits in int64.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>

namespace ep_kernels {
namespace checks {

constexpr int64_t kMaxGeometry = 2147483647;

// torch's Python spelling of a dtype, so messages read the same from C++ and Python.
inline std::string dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(st);
  }
}

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void tensor(const char* op, const at::Tensor& t, const char* name, int64_t ndim = -1,
                   const char* layout = "") {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a Tensor, got an undefined tensor");
  if (ndim >= 0)
    TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must have ", ndim, " dimensions", layout, ", got shape ",
                      t.sizes());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
                    t.layout());
  for (int64_t d : t.sizes())
    TORCH_CHECK_VALUE(d <= kMaxGeometry, op, ": ", name, " has a dimension larger than ", kMaxGeometry, ": shape ",
                      t.sizes());
}

inline void floating(const char* op, const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
                   " must be floating-point (float32, float64, bfloat16 or float16), got ", dtype_name(st));
}

// t is a tensor with ref's dtype and device.
inline void like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                 int64_t ndim = -1, const char* layout = "") {
  tensor(op, t, name, ndim, layout);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", dtype_name(t.scalar_type()),
                   " but ", ref_name, " has ", dtype_name(ref.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

inline void index_tensor(const char* op, const at::Tensor& idx, const char* name, const at::Tensor& s,
                         const char* s_name) {
  tensor(op, idx, name);
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, op, ": ", name, " must have dtype torch.int64, got ",
                   dtype_name(idx.scalar_type()));
  TORCH_CHECK_VALUE(idx.device() == s.device(), op, ": ", name, " is on ", idx.device(), " but ", s_name, " is on ",
                    s.device());
  TORCH_CHECK_VALUE(idx.sizes() == s.sizes(), op, ": ", name, " has shape ", idx.sizes(), " but ", s_name, " has ",
                    s.sizes());
}

inline void int_pair(const char* op, at::IntArrayRef v, const char* name, int64_t lo) {
  const bool ok = v.size() == 2 && v[0] >= lo && v[1] >= lo && v[0] <= kMaxGeometry && v[1] <= kMaxGeometry;
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must be 2 ints in [", lo, ", ", kMaxGeometry, "], got ", v);
}

inline void int_in_range(const char* op, int64_t v, const char* name, int64_t lo) {
  TORCH_CHECK_VALUE(v >= lo && v <= kMaxGeometry, op, ": ", name, " must be an int in [", lo, ", ", kMaxGeometry,
                    "], got ", v);
}

inline void finite_number(const char* op, double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " must be a finite number, got ", v);
}

inline void conv_params(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups, int64_t pool) {
  int_pair(op, stride, "stride", 1);
  int_pair(op, padding, "padding", 0);
  int_pair(op, dilation, "dilation", 1);
  int_in_range(op, groups, "groups", 1);
  int_in_range(op, pool, "pool", 1);
}

// The convolution's output size; exact under the geometry bounds (floor division, a negative
// numerator meaning an empty output, as Python's // gives).
inline std::array<int64_t, 2> conv_out_size(int64_t h, int64_t w, int64_t kh, int64_t kw, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nh = h + 2 * padding[0] - dilation[0] * (kh - 1) - 1;
  const int64_t nw = w + 2 * padding[1] - dilation[1] * (kw - 1) - 1;
  auto floor_div = [](int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
  return {floor_div(nh, stride[0]) + 1, floor_div(nw, stride[1]) + 1};
}

// weight (C_out, C_in / groups, kH, kW) against c_in input channels.
inline void weight_for(const char* op, const at::Tensor& weight, int64_t c_in, const char* in_name, int64_t groups) {
  TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1, op,
                    ": weight must have no zero-sized dimension, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) % groups == 0, op, ": weight has ", weight.size(0),
                    " output channels, not divisible by groups=", groups);
  TORCH_CHECK_VALUE(c_in == weight.size(1) * groups, op, ": ", in_name, " has ", c_in,
                    " channels but the weight (shape ", weight.sizes(), ", groups=", groups, ") expects ",
                    weight.size(1) * groups);
}

inline void state_size(const char* op, const at::Tensor& s, const char* name, at::IntArrayRef conv_out,
                       int64_t pool) {
  const std::array<int64_t, 2> want = {conv_out[0] / pool, conv_out[1] / pool};
  TORCH_CHECK_VALUE(s.size(2) == want[0] && s.size(3) == want[1], op, ": ", name, " has spatial size [", s.size(2),
                    ", ", s.size(3), "] but ", pool > 1 ? "conv_out_size // pool" : "conv_out_size", " is [",
                    want[0], ", ", want[1], "]");
}

inline void given_conv_out_size(const char* op, at::IntArrayRef conv_out, int64_t h, int64_t w,
                                const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, const char* what, bool with_size) {
  // The message is built only on failure (TORCH_CHECK formats lazily): checks run on every call.
  int_pair(op, conv_out, "conv_out_size", 0);
  const auto want = conv_out_size(h, w, weight.size(2), weight.size(3), stride, padding, dilation);
  TORCH_CHECK_VALUE(conv_out[0] == want[0] && conv_out[1] == want[1], op, ": conv_out_size ", conv_out,
                    " does not match the convolution of ", what,
                    with_size ? c10::str(" of size [", h, ", ", w, "]") : std::string(),
                    " (which gives [", want[0], ", ", want[1], "])");
}

// ---- the ops ------------------------------------------------------------------------------

// Returns the convolution's output size.
inline std::array<int64_t, 2> conv_pool_drive(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                              int64_t pool) {
  constexpr const char* op = "conv_pool_drive";
  conv_params(op, stride, padding, dilation, groups, pool);
  tensor(op, x, "x", 4, " (N, C, H, W)");
  floating(op, x, "x");
  like(op, weight, "weight", x, "x", 4, " (C_out, C_in / groups, kH, kW)");
  weight_for(op, weight, x.size(1), "x", groups);
  if (present(bias)) {
    like(op, *bias, "bias", x, "x", 1, " (C_out,)");
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), op, ": bias has ", bias->size(0), " entries for ",
                      weight.size(0), " output channels");
  }
  const auto hw = conv_out_size(x.size(2), x.size(3), weight.size(2), weight.size(3), stride, padding, dilation);
  TORCH_CHECK_VALUE(hw[0] >= pool && hw[1] >= pool, op, ": x of shape ", x.sizes(), " gives a ", hw[0], "x", hw[1],
                    " convolution output, too small for pool=", pool);
  return hw;
}

inline void pool_conv_transpose(const at::Tensor& s, const at::Tensor& indices, const at::Tensor& weight,
                                at::IntArrayRef input_size, at::IntArrayRef conv_out, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t pool) {
  constexpr const char* op = "pool_conv_transpose";
  conv_params(op, stride, padding, dilation, groups, pool);
  tensor(op, s, "s", 4, " (N, C_out, Hp, Wp)");
  floating(op, s, "s");
  like(op, weight, "weight", s, "s", 4, " (C_out, C_in / groups, kH, kW)");
  TORCH_CHECK_VALUE(s.size(1) == weight.size(0), op, ": s has ", s.size(1), " channels but weight has ",
                    weight.size(0), " output channels");
  weight_for(op, weight, weight.size(1) * groups, "the input", groups);
  int_pair(op, input_size, "input_size", 1);
  given_conv_out_size(op, conv_out, input_size[0], input_size[1], weight, stride, padding, dilation, "an input",
                      true);
  state_size(op, s, "s", conv_out, pool);
  if (pool > 1) index_tensor(op, indices, "indices", s, "s");
}

// Whether two tensors may share bytes: the same storage and intersecting byte ranges.
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const at::Tensor& t) {
    int64_t hi = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) hi += (t.size(d) - 1) * std::abs(t.stride(d));
    return std::array<int64_t, 2>{t.storage_offset() * t.element_size(), (hi + 1) * t.element_size()};
  };
  const auto sa = span(a), sb = span(b);
  return sa[0] < sb[1] && sb[0] < sa[1];
}

inline bool same_memory(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type();
}

inline void state_update(const at::Tensor& drive, const c10::optional<at::Tensor>& top_down,
                         const c10::optional<at::Tensor>& nudge, const c10::optional<at::Tensor>& prev, double gain,
                         const at::Tensor& out) {
  constexpr const char* op = "state_update";
  tensor(op, drive, "drive");
  floating(op, drive, "drive");
  finite_number(op, gain, "gain");
  auto operand = [&](const at::Tensor& t, const char* name) {
    like(op, t, name, drive, "drive");
    TORCH_CHECK_VALUE(t.sizes() == drive.sizes(), op, ": ", name, " has shape ", t.sizes(), " but drive has ",
                      drive.sizes());
  };
  if (present(top_down)) operand(*top_down, "top_down");
  if (present(nudge)) operand(*nudge, "nudge");
  if (present(prev)) operand(*prev, "prev");
  operand(out, "out");
  // Memory (the Python wrapper checks the same on real tensors).
  TORCH_CHECK_VALUE(!present(prev) || !may_overlap(out, *prev), op,
                    ": out overlaps prev in memory (the change would be lost); give out its own buffer");
  const std::pair<const c10::optional<at::Tensor>*, const char*> summed[] = {
      {nullptr, "drive"}, {&top_down, "top_down"}, {&nudge, "nudge"}};
  for (const auto& [t, name] : summed) {
    const at::Tensor& v = t == nullptr ? drive : (present(*t) ? **t : at::Tensor());
    if (!v.defined()) continue;
    TORCH_CHECK_VALUE(!may_overlap(out, v) || same_memory(out, v), op, ": out partly overlaps ", name,
                      " in memory; out may be ", name, " itself (an in-place update) or separate memory");
  }
}

inline void contrastive_conv_grad(const at::Tensor& x_a, const at::Tensor& s_a, const at::Tensor& idx_a,
                                  const at::Tensor& x_b, const at::Tensor& s_b, const at::Tensor& idx_b,
                                  at::IntArrayRef conv_out, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, int64_t pool, double scale,
                                  const at::Tensor& grad_weight, const c10::optional<at::Tensor>& grad_bias) {
  constexpr const char* op = "contrastive_conv_grad";
  conv_params(op, stride, padding, dilation, groups, pool);
  finite_number(op, scale, "scale");
  tensor(op, grad_weight, "grad_weight", 4, " (C_out, C_in / groups, kH, kW)");
  floating(op, grad_weight, "grad_weight");
  const std::pair<const at::Tensor*, const char*> states[] = {{&x_a, "x_a"}, {&s_a, "s_a"}, {&x_b, "x_b"},
                                                              {&s_b, "s_b"}};
  for (const auto& [t, name] : states) like(op, *t, name, grad_weight, "grad_weight", 4, " (N, C, H, W)");
  TORCH_CHECK_VALUE(x_a.sizes() == x_b.sizes(), op, ": x_a has shape ", x_a.sizes(), " but x_b has ", x_b.sizes());
  TORCH_CHECK_VALUE(s_a.sizes() == s_b.sizes(), op, ": s_a has shape ", s_a.sizes(), " but s_b has ", s_b.sizes());
  TORCH_CHECK_VALUE(x_a.size(0) == s_a.size(0), op, ": x_a has batch ", x_a.size(0), " but s_a has ", s_a.size(0));
  weight_for(op, grad_weight, x_a.size(1), "x_a", groups);
  TORCH_CHECK_VALUE(s_a.size(1) == grad_weight.size(0), op, ": s_a has ", s_a.size(1),
                    " channels but grad_weight has ", grad_weight.size(0), " output channels");
  given_conv_out_size(op, conv_out, x_a.size(2), x_a.size(3), grad_weight, stride, padding, dilation, "x_a", false);
  state_size(op, s_a, "s_a", conv_out, pool);
  if (pool > 1) {
    index_tensor(op, idx_a, "idx_a", s_a, "s_a");
    index_tensor(op, idx_b, "idx_b", s_b, "s_b");
  }
  if (present(grad_bias)) {
    like(op, *grad_bias, "grad_bias", grad_weight, "grad_weight", 1, " (C_out,)");
    TORCH_CHECK_VALUE(grad_bias->size(0) == grad_weight.size(0), op, ": grad_bias has ", grad_bias->size(0),
                      " entries for ", grad_weight.size(0), " output channels");
  }
}

// A kernel registered for one device type got its first operand on another (the dispatcher
// routes by every operand's device, so the contract's device checks have already run).
inline void on_device_type(const char* op, const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, op, ": the ", c10::DeviceTypeName(type, /*lower_case=*/true),
              " kernel got ", name, " on ", t.device());
}

// The first index of a (N, C, Hp, Wp) argmax tensor that is not inside its own k x k window of
// the (hc, wc) convolution output (flat position of the window's winner), or -1. The compiled
// CPU kernels refuse such indices whatever the state's value there.
inline int64_t first_index_outside_window(const at::Tensor& idx_contig, int64_t hc, int64_t wc, int64_t k) {
  const int64_t hp = idx_contig.size(2), wp = idx_contig.size(3), p_n = hp * wp;
  const int64_t* in = idx_contig.const_data_ptr<int64_t>();
  const int64_t total = idx_contig.numel();
  for (int64_t e = 0; e < total; ++e) {
    const int64_t a = in[e], p = e % p_n, ph = p / wp, pw = p % wp;
    const bool inside = a >= 0 && a < hc * wc && (a / wc) / k == ph && (a % wc) / k == pw;
    if (!inside) return e;
  }
  return -1;
}

// The error for such an index, naming its position.
[[noreturn]] inline void index_outside_window(const char* op, const char* name, const at::Tensor& idx_contig,
                                              int64_t e, int64_t hc, int64_t wc, int64_t k) {
  const int64_t c = idx_contig.size(1), hp = idx_contig.size(2), wp = idx_contig.size(3), p_n = hp * wp;
  TORCH_CHECK_VALUE(false, op, ": ", name, "[", e / (c * p_n), ", ", (e / p_n) % c, ", ", (e % p_n) / wp, ", ",
                    e % wp, "] = ", idx_contig.const_data_ptr<int64_t>()[e], " is outside its ", k, "x", k,
                    " pooling window (indices must come from a max-pool of stride ", k, " over the ", hc, "x", wc,
                    " convolution output)");
}

}  // namespace checks
}  // namespace ep_kernels
