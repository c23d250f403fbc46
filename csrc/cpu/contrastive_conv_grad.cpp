// Contrastive conv weight update, both states in one weight-gradient: stacking
// [x_a; x_b] with output-gradients [U(s_a); -U(s_b)] along the batch gives
// dW(a) - dW(b) in one convolution pass, accumulated into grad_weight in place.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace ep_kernels {
namespace {

void contrastive_conv_grad_cpu(const at::Tensor& x_a, const at::Tensor& s_a, const at::Tensor& idx_a,
                               const at::Tensor& x_b, const at::Tensor& s_b, const at::Tensor& idx_b,
                               at::IntArrayRef conv_out_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, int64_t pool, double scale,
                               at::Tensor& grad_weight, const c10::optional<at::Tensor>& grad_bias) {
  TORCH_CHECK(x_a.sizes() == x_b.sizes() && s_a.sizes() == s_b.sizes(),
              "contrastive_conv_grad: the two states must have equal shapes");
  auto unpool = [&](const at::Tensor& s, const at::Tensor& idx) {
    return pool > 1 ? at::max_unpool2d(s, idx, conv_out_size) : s;
  };
  auto x = at::cat({x_a, x_b}, 0);
  auto g = at::cat({unpool(s_a, idx_a), unpool(s_b, idx_b).neg()}, 0);
  auto res = at::convolution_backward(g, x, grad_weight, c10::nullopt, stride, padding, dilation, false, {0, 0},
                                      groups, {false, true, false});
  grad_weight.add_(std::get<1>(res), scale);
  if (grad_bias) {
    auto gb = *grad_bias;
    gb.add_(s_a.sum({0, 2, 3}) - s_b.sum({0, 2, 3}), scale);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) { m.impl("contrastive_conv_grad", &contrastive_conv_grad_cpu); }

}  // namespace ep_kernels
