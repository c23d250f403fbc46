// Top-down through a max-pool and a conv on CUDA: W^T * U(s).
//
// U (the max-unpooled state) is written by one gather kernel (each element reads its window's
// argmax and state once: no zero-fill pass), then cuDNN's transposed convolution (ATen's
// convolution_backward for the input, as the reference calls it) runs on tensor cores.
// Why not the CPU kernel's sparse scatter (only the argmax positions, 1/k^2 of the work):
// every output channel has its own argmax position, so the sparse form is a sum of rank-1
// updates at per-channel positions, which runs on CUDA cores with atomics or strided gathers;
// the dense GEMM on tensor cores (TF32: about 7x the FP32 CUDA-core rate of an H100/H200) is
// faster than 1/k^2 = 1/4 of the work on CUDA cores. Indices must be those of a k x k max-pool of stride k (each inside its own
// window); an index outside its window contributes nothing here (not checked on the device).
#include <torch/library.h>

#include "cuda/common.cuh"

namespace ep_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "pool_conv_transpose";

at::Tensor pool_conv_transpose_cuda(const at::Tensor& s, const at::Tensor& indices, const at::Tensor& weight,
                                    at::IntArrayRef input_size, at::IntArrayRef conv_out_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t pool) {
  checks::pool_conv_transpose(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool);
  checks::on_device_type(kOp, s, "s", c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(s.device());
  at::Tensor u = s;
  if (pool > 1) {
    auto sc = s.contiguous();
    auto ic = indices.contiguous();
    u = at::empty({s.size(0), s.size(1), conv_out_size[0], conv_out_size[1]}, s.options());
    unpool(sc, ic, at::Tensor(), at::Tensor(), u, pool, 1.f);
  }
  std::vector<int64_t> in_shape = {s.size(0), weight.size(1) * groups, input_size[0], input_size[1]};
  auto out = at::convolution_backward(u, at::empty(in_shape, s.options()), weight, c10::nullopt, stride, padding,
                                      dilation, false, {0, 0}, groups, {true, false, false});
  return std::get<0>(out).contiguous();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ep_kernels, CUDA, m) { m.impl("pool_conv_transpose", &cuda::pool_conv_transpose_cuda); }

}  // namespace ep_kernels
