// Contrastive conv weight update on CUDA, both states in one weight-gradient:
// grad_weight += scale * (dW(x_a, U(s_a)) - dW(x_b, U(s_b))), grad_bias += scale * (sum s_a - sum s_b).
//
// One gather kernel writes the signed unpooled states, then one cuDNN weight-gradient
// (ATen's convolution_backward) computes the difference and the result is added in place:
//   - x_a and x_b the same tensor (the first layer: both nudged states read the input): the map
//     U(s_a) - U(s_b) on a batch of N, so the weight-gradient runs once, on N examples;
//   - otherwise [U(s_a); -U(s_b)] against [x_a; x_b], a batch of 2N in one call.
// Why not the CPU kernel's sparse accumulation over argmax positions only: see
// pool_conv_transpose.cu (per-channel argmax positions defeat a GEMM; the dense GEMM on tensor
// cores wins). Indices are not validated on the device (an index outside its window
// contributes nothing).
#include <torch/library.h>

#include "cuda/common.cuh"

namespace ep_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "contrastive_conv_grad";

bool same_data(const at::Tensor& a, const at::Tensor& b) {
  return a.is_same(b) || (a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
                          a.scalar_type() == b.scalar_type() && a.device() == b.device());
}

void contrastive_conv_grad_cuda(const at::Tensor& x_a, const at::Tensor& s_a, const at::Tensor& idx_a,
                                const at::Tensor& x_b, const at::Tensor& s_b, const at::Tensor& idx_b,
                                at::IntArrayRef conv_out_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, int64_t pool, double scale,
                                at::Tensor& grad_weight, const c10::optional<at::Tensor>& grad_bias) {
  checks::contrastive_conv_grad(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding, dilation, groups,
                                pool, scale, grad_weight, grad_bias);
  checks::on_device_type(kOp, grad_weight, "grad_weight", c10::DeviceType::CUDA);
  const bool has_bias = checks::present(grad_bias);
  c10::cuda::CUDAGuard guard(grad_weight.device());
  const int64_t n = s_a.size(0), c = s_a.size(1);
  auto sa = s_a.contiguous(), sb = s_b.contiguous();
  auto ia = pool > 1 ? idx_a.contiguous() : at::Tensor(), ib = pool > 1 ? idx_b.contiguous() : at::Tensor();
  at::Tensor u, x;
  if (same_data(x_a, x_b)) {
    u = at::empty({n, c, conv_out_size[0], conv_out_size[1]}, sa.options());
    unpool(sa, ia, sb, ib, u, pool, 1.f);
    x = x_a;
  } else {
    u = at::empty({2 * n, c, conv_out_size[0], conv_out_size[1]}, sa.options());
    unpool(sa, ia, at::Tensor(), at::Tensor(), u.narrow(0, 0, n), pool, 1.f);
    unpool(sb, ib, at::Tensor(), at::Tensor(), u.narrow(0, n, n), pool, -1.f);
    x = at::cat({x_a, x_b}, 0);
  }
  auto res = at::convolution_backward(u, x, grad_weight, c10::nullopt, stride, padding, dilation, false, {0, 0},
                                      groups, {false, true, false});
  grad_weight.add_(std::get<1>(res), scale);
  if (has_bias) {
    auto gb = *grad_bias;
    gb.add_(s_a.sum({0, 2, 3}) - s_b.sum({0, 2, 3}), scale);
  }
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ep_kernels, CUDA, m) { m.impl("contrastive_conv_grad", &cuda::contrastive_conv_grad_cuda); }

}  // namespace ep_kernels
