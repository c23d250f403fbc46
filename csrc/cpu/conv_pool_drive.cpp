// conv + bias + k x k max-pool (stride k) with argmax: the drive P(W * x + b) of a conv synapse.
//
// The convolution (with its bias) is ATen's, called exactly as the reference calls it, so the
// pre-pool values are bitwise those of the reference; then one OpenMP pass over the conv output
// computes each window's max and argmax (ties to the first position of the window in row-major
// order; NaN wins, the last NaN of a window, as in max_pool2d), writing only the pooled drive and
// the indices (pool_argmax.h). ATen's max_pool2d_with_indices costs about half a convolution
// on the VGG-5 shapes (several ns per element); this pass is ~30x cheaper. Results are bitwise
// equal to the reference.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/pool_argmax.h"

namespace ep_kernels {
namespace {

constexpr const char* kOp = "conv_pool_drive";

std::tuple<at::Tensor, at::Tensor> conv_pool_drive_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const c10::optional<at::Tensor>& bias,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups, int64_t pool) {
  checks::conv_pool_drive(x, weight, bias, stride, padding, dilation, groups, pool);
  checks::on_device_type(kOp, x, "x", c10::DeviceType::CPU);

  at::Tensor y;
  if (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) {
    // In float32, rounded once: torch 2.13's oneDNN bfloat16 forward convolution segfaults on
    // CPUs with AMX for some geometries (e.g. a 1x6 input, 3x2 kernel, stride 2, dilation 2),
    // and oneDNN accumulates in float32 anyway (ep_kernels/_conv.py).
    c10::optional<at::Tensor> bias_f;
    if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat);
    y = at::conv2d(x.to(at::kFloat), weight.to(at::kFloat), bias_f, stride, padding, dilation, groups)
            .to(x.scalar_type())
            .contiguous();
  } else {
    y = at::conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous();
  }
  if (pool == 1) return {y, at::empty({0}, x.options().dtype(at::kLong))};

  const int64_t n = y.size(0), c = y.size(1), hc = y.size(2), wc = y.size(3);
  auto out = at::empty({n, c, hc / pool, wc / pool}, y.options());
  auto idx = at::empty({n, c, hc / pool, wc / pool}, y.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "conv_pool_drive_cpu", [&] {
    pool_argmax::run<scalar_t>(y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                               idx.mutable_data_ptr<int64_t>(), n * c, hc, wc, pool);
  });
  return {out, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) { m.impl("conv_pool_drive", &conv_pool_drive_cpu); }

}  // namespace ep_kernels
