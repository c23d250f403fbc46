// conv + bias + max-pool with argmax. First version: ATen's convolution followed by a
// max-pool-with-indices (ties to the first window position, like max_pool2d).
#include <ATen/ATen.h>
#include <torch/library.h>

namespace ep_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> conv_pool_drive_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const c10::optional<at::Tensor>& bias,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups, int64_t pool) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "conv_pool_drive: x and weight must be 4-D, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "conv_pool_drive (cpu): CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "conv_pool_drive: dtype mismatch ", x.scalar_type(),
              " vs ", weight.scalar_type());
  TORCH_CHECK(pool >= 1, "conv_pool_drive: pool must be >= 1, got ", pool);
  auto y = at::conv2d(x, weight, bias, stride, padding, dilation, groups);
  if (pool == 1) return {y, at::empty({0}, x.options().dtype(at::kLong))};
  return at::max_pool2d_with_indices(y, {pool, pool}, {pool, pool});
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) { m.impl("conv_pool_drive", &conv_pool_drive_cpu); }

}  // namespace ep_kernels
