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
  check_cuda(grad_weight, kOp, "grad_weight");
  check_dim(grad_weight, 4, kOp, "grad_weight");
  check_floating(grad_weight, kOp, "grad_weight");
  const std::pair<const at::Tensor*, const char*> states[] = {{&x_a, "x_a"}, {&s_a, "s_a"}, {&x_b, "x_b"},
                                                              {&s_b, "s_b"}};
  for (const auto& [t, name] : states) {
    check_cuda(*t, kOp, name);
    check_same_device(*t, grad_weight, kOp, name, "grad_weight");
    check_dim(*t, 4, kOp, name);
    check_same_dtype(*t, grad_weight, kOp, name, "grad_weight");
  }
  TORCH_CHECK(x_a.sizes() == x_b.sizes(), kOp, ": x_a has shape ", x_a.sizes(), " but x_b has ", x_b.sizes());
  TORCH_CHECK(s_a.sizes() == s_b.sizes(), kOp, ": s_a has shape ", s_a.sizes(), " but s_b has ", s_b.sizes());
  TORCH_CHECK(x_a.size(0) == s_a.size(0), kOp, ": x_a has batch ", x_a.size(0), " but s_a has ", s_a.size(0));
  check_conv_params(stride, padding, dilation, groups, pool, kOp);
  check_weight(grad_weight, x_a.size(1), groups, kOp, "x_a");
  TORCH_CHECK(s_a.size(1) == grad_weight.size(0), kOp, ": s_a has ", s_a.size(1), " channels but grad_weight has ",
              grad_weight.size(0), " output channels");
  TORCH_CHECK(conv_out_size.size() == 2, kOp, ": conv_out_size must have 2 entries, got ", conv_out_size);
  const auto hw = conv_out_hw(x_a.size(2), x_a.size(3), grad_weight, stride, padding, dilation);
  TORCH_CHECK(hw[0] == conv_out_size[0] && hw[1] == conv_out_size[1], kOp, ": conv_out_size ", conv_out_size,
              " does not match the convolution of x_a (which gives [", hw[0], ", ", hw[1], "])");
  if (pool > 1) {
    check_index_tensor(idx_a, s_a, kOp, "idx_a", "s_a");
    check_index_tensor(idx_b, s_b, kOp, "idx_b", "s_b");
    TORCH_CHECK(s_a.size(2) == conv_out_size[0] / pool && s_a.size(3) == conv_out_size[1] / pool, kOp,
                ": s_a has spatial size [", s_a.size(2), ", ", s_a.size(3), "] but conv_out_size // pool is [",
                conv_out_size[0] / pool, ", ", conv_out_size[1] / pool, "]");
  } else {
    TORCH_CHECK(s_a.size(2) == conv_out_size[0] && s_a.size(3) == conv_out_size[1], kOp, ": s_a has spatial size [",
                s_a.size(2), ", ", s_a.size(3), "] but conv_out_size is ", conv_out_size);
  }
  const bool has_bias = grad_bias.has_value() && grad_bias->defined();
  if (has_bias) {
    check_cuda(*grad_bias, kOp, "grad_bias");
    check_same_device(*grad_bias, grad_weight, kOp, "grad_bias", "grad_weight");
    check_dim(*grad_bias, 1, kOp, "grad_bias");
    check_same_dtype(*grad_bias, grad_weight, kOp, "grad_bias", "grad_weight");
    TORCH_CHECK(grad_bias->size(0) == grad_weight.size(0), kOp, ": grad_bias has ", grad_bias->size(0),
                " entries for ", grad_weight.size(0), " output channels");
  }
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
