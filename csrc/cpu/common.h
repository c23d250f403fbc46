// Argument checks shared by the CPU kernels. Every kernel validates its inputs itself
// (the Python wrappers check too, but torch.ops.ep_kernels.* can be called directly):
// bad input is a RuntimeError naming the argument, never a crash or a wrong answer.
#pragma once

#include <ATen/ATen.h>
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

}  // namespace ep_kernels
