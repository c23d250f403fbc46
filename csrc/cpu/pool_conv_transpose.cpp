// Top-down through a max-pool and a conv: W^T * U(s). First version: ATen's max-unpool and
// the convolution's input-gradient.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace ep_kernels {
namespace {

at::Tensor pool_conv_transpose_cpu(const at::Tensor& s, const at::Tensor& indices, const at::Tensor& weight,
                                   at::IntArrayRef input_size, at::IntArrayRef conv_out_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, int64_t pool) {
  TORCH_CHECK(s.dim() == 4 && weight.dim() == 4, "pool_conv_transpose: s and weight must be 4-D");
  TORCH_CHECK(s.scalar_type() == weight.scalar_type(), "pool_conv_transpose: dtype mismatch");
  at::Tensor u = s;
  if (pool > 1) {
    TORCH_CHECK(indices.sizes() == s.sizes(), "pool_conv_transpose: indices shape ", indices.sizes(),
                " != s shape ", s.sizes());
    u = at::max_unpool2d(s, indices, conv_out_size);
  }
  std::vector<int64_t> in_shape = {s.size(0), weight.size(1) * groups, input_size[0], input_size[1]};
  auto out = at::convolution_backward(u, at::empty(in_shape, s.options()), weight, c10::nullopt, stride, padding,
                                      dilation, false, {0, 0}, groups, {true, false, false});
  return std::get<0>(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) { m.impl("pool_conv_transpose", &pool_conv_transpose_cpu); }

}  // namespace ep_kernels
