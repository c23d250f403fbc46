// conv + bias + k x k max-pool (stride k) with argmax on CUDA: the convolution is ATen's
// (cuDNN) without its bias, then one epilogue kernel adds the bias, pools and writes the argmax,
// so the full-resolution output is read once and never written back (ATen's cuDNN path adds the
// bias as a separate pass over the output; the values are the same). Winner rule as
// max_pool2d: greater than the best so far, or NaN (ties keep the first position of the window
// in row-major order; the last NaN of a window wins). 16-bit types: the biased value is rounded
// to the storage type before comparing, as the reference compares stored values.
#include <torch/library.h>

#include "cuda/common.cuh"

namespace ep_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "conv_pool_drive";

template <typename scalar_t>
__global__ void pool_argmax_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ bias,
                                   scalar_t* __restrict__ out, int64_t* __restrict__ idx, int64_t total, int64_t C,
                                   int64_t HC, int64_t WC, int64_t HP, int64_t WP, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pw = i % WP;
    const int64_t t = i / WP;
    const int64_t ph = t % HP;
    const int64_t plane = t / HP;
    const scalar_t* base = y + plane * HC * WC;
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[plane % C]) : acc_t(0);
    acc_t best = acc_t(0);
    int64_t code = 0;
    for (int64_t r = 0; r < K; ++r) {
      for (int64_t q = 0; q < K; ++q) {
        const int64_t pos = (ph * K + r) * WC + pw * K + q;
        acc_t v = static_cast<acc_t>(base[pos]);
        if (bias != nullptr) v = static_cast<acc_t>(static_cast<scalar_t>(v + b));
        if ((r == 0 && q == 0) || v > best || v != v) {
          best = v;
          code = pos;
        }
      }
    }
    out[i] = static_cast<scalar_t>(best);
    idx[i] = code;
  }
}

std::tuple<at::Tensor, at::Tensor> conv_pool_drive_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, int64_t pool) {
  const auto hw = checks::conv_pool_drive(x, weight, bias, stride, padding, dilation, groups, pool);
  checks::on_device_type(kOp, x, "x", c10::DeviceType::CUDA);
  const bool has_bias = checks::present(bias);
  c10::cuda::CUDAGuard guard(x.device());
  if (pool == 1) {
    return {at::conv2d(x, weight, bias, stride, padding, dilation, groups),
            at::empty({0}, x.options().dtype(at::kLong))};
  }
  auto y = at::conv2d(x, weight, c10::nullopt, stride, padding, dilation, groups).contiguous();
  const int64_t n = y.size(0), c = y.size(1), hc = y.size(2), wc = y.size(3);
  auto out = at::empty({n, c, hc / pool, wc / pool}, y.options());
  auto idx = at::empty({n, c, hc / pool, wc / pool}, y.options().dtype(at::kLong));
  const int64_t total = out.numel();
  if (total > 0) {
    auto b = has_bias ? bias->contiguous() : at::Tensor();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "conv_pool_drive_cuda", [&] {
      pool_argmax_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
          out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>(), total, c, hc, wc, hc / pool, wc / pool,
          pool);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, idx};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ep_kernels, CUDA, m) { m.impl("conv_pool_drive", &cuda::conv_pool_drive_cuda); }

}  // namespace ep_kernels
