// Argument checks shared by the CPU kernels. Every kernel validates its inputs itself
// (the Python wrappers check too, but torch.ops.ep_kernels.* can be called directly):
// bad input is a RuntimeError naming the argument, never a crash or a wrong answer.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace ep_kernels {

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  check_defined(t, op, name);
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu): ", name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t ndim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must have ", ndim, " dimensions, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
              " must be a floating-point tensor, got ", st);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
}

inline void check_index_tensor(const at::Tensor& idx, const at::Tensor& s, const char* op, const char* name,
                               const char* s_name) {
  check_cpu(idx, op, name);
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": ", name, " must have dtype int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.sizes() == s.sizes(), op, ": ", name, " has shape ", idx.sizes(), " but ", s_name, " has ",
              s.sizes());
}

// Convolution hyper-parameters: lengths and ranges.
inline void check_conv_params(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, int64_t pool, const char* op) {
  TORCH_CHECK(stride.size() == 2, op, ": stride must have 2 entries, got ", stride);
  TORCH_CHECK(padding.size() == 2, op, ": padding must have 2 entries, got ", padding);
  TORCH_CHECK(dilation.size() == 2, op, ": dilation must have 2 entries, got ", dilation);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(pool >= 1, op, ": pool must be >= 1, got ", pool);
}

// Checks weight (C_out, C_in/groups, kh, kw) against the channel counts.
inline void check_weight(const at::Tensor& weight, int64_t c_in, int64_t groups, const char* op,
                         const char* in_name) {
  check_dim(weight, 4, op, "weight");
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(1) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1, op,
              ": weight must have no zero-sized dimension, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": weight has ", weight.size(0),
              " output channels, not divisible by groups=", groups);
  TORCH_CHECK(c_in == weight.size(1) * groups, op, ": ", in_name, " has ", c_in, " channels but the weight (shape ",
              weight.sizes(), ", groups=", groups, ") expects ", weight.size(1) * groups);
}

// The convolution output size for an input of spatial size (h, w).
inline std::vector<int64_t> conv_out_hw(int64_t h, int64_t w, const at::Tensor& weight, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  int64_t ho = (h + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  int64_t wo = (w + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  // C++ division truncates toward zero; a negative numerator means an empty output.
  if (h + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1 < 0) ho = 0;
  if (w + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1 < 0) wo = 0;
  return {ho, wo};
}

// ---- Shape checks shared by the CPU and the CUDA kernels (each backend checks devices and
// index tensors itself, then calls these, so both give the same messages).

// s's spatial size against the pooled convolution output.
inline void check_state_size(const at::Tensor& s, at::IntArrayRef conv_out_size, int64_t pool, const char* op,
                             const char* name) {
  if (pool > 1) {
    TORCH_CHECK(s.size(2) == conv_out_size[0] / pool && s.size(3) == conv_out_size[1] / pool, op, ": ", name,
                " has spatial size [", s.size(2), ", ", s.size(3), "] but conv_out_size // pool is [",
                conv_out_size[0] / pool, ", ", conv_out_size[1] / pool, "]");
  } else {
    TORCH_CHECK(s.size(2) == conv_out_size[0] && s.size(3) == conv_out_size[1], op, ": ", name,
                " has spatial size [", s.size(2), ", ", s.size(3), "] but conv_out_size is ", conv_out_size);
  }
}

// conv_out_size against the convolution of an input of spatial size (h, w).
inline void check_conv_out_size(at::IntArrayRef conv_out_size, int64_t h, int64_t w, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                const char* op, const std::string& what) {
  TORCH_CHECK(conv_out_size.size() == 2, op, ": conv_out_size must have 2 entries, got ", conv_out_size);
  const auto hw = conv_out_hw(h, w, weight, stride, padding, dilation);
  TORCH_CHECK(hw[0] == conv_out_size[0] && hw[1] == conv_out_size[1], op, ": conv_out_size ", conv_out_size,
              " does not match the convolution of ", what, " (which gives [", hw[0], ", ", hw[1], "])");
}

// pool_conv_transpose: s (N, C_out, Hp, Wp), weight, sizes and parameters.
inline void check_pool_conv_transpose_shapes(const at::Tensor& s, const at::Tensor& weight,
                                             at::IntArrayRef input_size, at::IntArrayRef conv_out_size,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation, int64_t groups, int64_t pool,
                                             const char* op) {
  check_dim(s, 4, op, "s");
  check_floating(s, op, "s");
  check_same_dtype(weight, s, op, "weight", "s");
  check_conv_params(stride, padding, dilation, groups, pool, op);
  check_dim(weight, 4, op, "weight");
  TORCH_CHECK(s.size(1) == weight.size(0), op, ": s has ", s.size(1), " channels but weight has ", weight.size(0),
              " output channels");
  check_weight(weight, weight.size(1) * groups, groups, op, "the input");
  TORCH_CHECK(input_size.size() == 2 && input_size[0] >= 1 && input_size[1] >= 1, op,
              ": input_size must be 2 positive ints, got ", input_size);
  check_conv_out_size(conv_out_size, input_size[0], input_size[1], weight, stride, padding, dilation, op,
                      c10::str("an input of size ", input_size));
  check_state_size(s, conv_out_size, pool, op, "s");
}

// contrastive_conv_grad: the two (input, state) pairs against grad_weight, sizes, parameters.
inline void check_contrastive_shapes(const at::Tensor& x_a, const at::Tensor& s_a, const at::Tensor& x_b,
                                     const at::Tensor& s_b, const at::Tensor& grad_weight,
                                     at::IntArrayRef conv_out_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                     int64_t pool, const char* op) {
  check_dim(grad_weight, 4, op, "grad_weight");
  check_floating(grad_weight, op, "grad_weight");
  const std::pair<const at::Tensor*, const char*> states[] = {{&x_a, "x_a"}, {&s_a, "s_a"}, {&x_b, "x_b"},
                                                              {&s_b, "s_b"}};
  for (const auto& [t, name] : states) {
    check_dim(*t, 4, op, name);
    check_same_dtype(*t, grad_weight, op, name, "grad_weight");
  }
  TORCH_CHECK(x_a.sizes() == x_b.sizes(), op, ": x_a has shape ", x_a.sizes(), " but x_b has ", x_b.sizes());
  TORCH_CHECK(s_a.sizes() == s_b.sizes(), op, ": s_a has shape ", s_a.sizes(), " but s_b has ", s_b.sizes());
  TORCH_CHECK(x_a.size(0) == s_a.size(0), op, ": x_a has batch ", x_a.size(0), " but s_a has ", s_a.size(0));
  check_conv_params(stride, padding, dilation, groups, pool, op);
  check_weight(grad_weight, x_a.size(1), groups, op, "x_a");
  TORCH_CHECK(s_a.size(1) == grad_weight.size(0), op, ": s_a has ", s_a.size(1), " channels but grad_weight has ",
              grad_weight.size(0), " output channels");
  check_conv_out_size(conv_out_size, x_a.size(2), x_a.size(3), grad_weight, stride, padding, dilation, op, "x_a");
  check_state_size(s_a, conv_out_size, pool, op, "s_a");
}

// state_update: dtypes, shapes and the out/prev overlap (devices are checked per backend).
inline void check_state_update_shapes(const at::Tensor& drive, const c10::optional<at::Tensor>& top_down,
                                      const c10::optional<at::Tensor>& nudge, const c10::optional<at::Tensor>& prev,
                                      const at::Tensor& out) {
  constexpr const char* op = "state_update";
  check_floating(drive, op, "drive");
  auto operand = [&](const at::Tensor& t, const char* name) {
    check_same_dtype(t, drive, op, name, "drive");
    TORCH_CHECK(t.sizes() == drive.sizes(), op, ": ", name, " has shape ", t.sizes(), " but drive has ",
                drive.sizes());
  };
  operand(out, "out");
  if (top_down.has_value() && top_down->defined()) operand(*top_down, "top_down");
  if (nudge.has_value() && nudge->defined()) operand(*nudge, "nudge");
  if (prev.has_value() && prev->defined()) {
    operand(*prev, "prev");
    const auto ov = at::get_overlap_status(out, *prev);
    TORCH_CHECK(ov != at::MemOverlapStatus::Full && ov != at::MemOverlapStatus::Partial, op,
                ": out must not alias (overlap) prev");
  }
}


// state_update's operands as both backends take them: each present one passes the backend's
// device check ``on_device(t, name)`` and check_state_update_shapes, then is made contiguous
// (an absent one stays undefined). ``out`` is checked, not copied: the kernels write it.
struct StateUpdateOperands {
  at::Tensor drive, top_down, nudge, prev;
};

template <typename OnDevice>
inline StateUpdateOperands state_update_operands(const at::Tensor& drive, const c10::optional<at::Tensor>& top_down,
                                                 const c10::optional<at::Tensor>& nudge,
                                                 const c10::optional<at::Tensor>& prev, const at::Tensor& out,
                                                 OnDevice on_device) {
  auto present = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  on_device(drive, "drive");
  on_device(out, "out");
  if (present(top_down)) on_device(*top_down, "top_down");
  if (present(nudge)) on_device(*nudge, "nudge");
  if (present(prev)) on_device(*prev, "prev");
  check_state_update_shapes(drive, top_down, nudge, prev, out);
  auto contiguous = [&](const c10::optional<at::Tensor>& t) { return present(t) ? t->contiguous() : at::Tensor(); };
  return {drive.contiguous(), contiguous(top_down), contiguous(nudge), contiguous(prev)};
}

}  // namespace ep_kernels
