// Fused state update on CUDA: out = clamp(gain * (drive + top_down + nudge), 0, 1) and
// max |out - prev| in one pass. Same operation order as the reference (float32/float64 results
// bitwise equal; 16-bit types compute in float and round once at the store). NaN propagates to
// out and to the change. Each block writes its maximum (NaN if any change is NaN) to a partial
// buffer, reduced by at::max (NaN-propagating): no atomics, no host synchronisation, so the op
// can be captured in a CUDA graph.
#include <torch/library.h>


#include "cuda/common.cuh"

namespace ep_kernels {
namespace cuda {
namespace {

template <typename acc_t>
__device__ inline void combine(acc_t& m, bool& nan, acc_t m2, bool nan2) {
  nan = nan || nan2;
  m = m2 > m ? m2 : m;
}

template <typename scalar_t>
__global__ void state_update_kernel(const scalar_t* __restrict__ drive, const scalar_t* __restrict__ td,
                                    const scalar_t* __restrict__ nudge, const scalar_t* __restrict__ prev,
                                    scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ partial,
                                    int64_t n, at::opmath_type<scalar_t> gain) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t m = acc_t(0);
  bool nan = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t v = static_cast<acc_t>(drive[i]);
    if (td != nullptr) v = v + static_cast<acc_t>(td[i]);
    if (nudge != nullptr) v = v + static_cast<acc_t>(nudge[i]);
    v = v * gain;
    v = v < acc_t(0) ? acc_t(0) : v;  // NaN kept: both comparisons are false
    v = v > acc_t(1) ? acc_t(1) : v;
    const scalar_t o = static_cast<scalar_t>(v);
    out[i] = o;
    if (prev != nullptr) {
      acc_t d = static_cast<acc_t>(o) - static_cast<acc_t>(prev[i]);
      d = d < acc_t(0) ? -d : d;
      if (d != d) {
        nan = true;
      } else {
        m = d > m ? d : m;
      }
    }
  }
  if (partial == nullptr) return;
  // block reduction: warps by shuffles, then the first warp over the warps' results
  __shared__ acc_t sm[32];
  __shared__ int sn[32];
  for (int off = 16; off > 0; off >>= 1) {
    acc_t m2 = __shfl_down_sync(0xffffffffu, m, off);
    int n2 = __shfl_down_sync(0xffffffffu, static_cast<int>(nan), off);
    combine(m, nan, m2, n2 != 0);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = (blockDim.x + 31) / 32;
  if (lane == 0) {
    sm[warp] = m;
    sn[warp] = nan;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < nwarps ? sm[lane] : acc_t(0);
    nan = lane < nwarps ? sn[lane] != 0 : false;
    for (int off = 16; off > 0; off >>= 1) {
      acc_t m2 = __shfl_down_sync(0xffffffffu, m, off);
      int n2 = __shfl_down_sync(0xffffffffu, static_cast<int>(nan), off);
      combine(m, nan, m2, n2 != 0);
    }
    if (lane == 0) partial[blockIdx.x] = nan ? acc_t(NAN) : m;
  }
}

at::Tensor state_update_cuda(const at::Tensor& drive, const c10::optional<at::Tensor>& top_down,
                             const c10::optional<at::Tensor>& nudge, const c10::optional<at::Tensor>& prev,
                             double gain, at::Tensor& out) {
  checks::state_update(drive, top_down, nudge, prev, gain, out);
  checks::on_device_type("state_update", drive, "drive", c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(drive.device());
  auto contiguous = [](const c10::optional<at::Tensor>& v) { return checks::present(v) ? v->contiguous() : at::Tensor(); };
  const at::Tensor d = drive.contiguous(), t = contiguous(top_down), g = contiguous(nudge), p = contiguous(prev);
  const bool has_prev = p.defined();
  at::Tensor o = out.is_contiguous() ? out : at::empty_like(d);
  const int64_t n = d.numel();
  const int blocks = blocks_for(n, 1024);
  const auto acc_type = d.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = has_prev ? at::zeros({blocks}, d.options().dtype(acc_type)) : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, d.scalar_type(), "state_update_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      state_update_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          d.const_data_ptr<scalar_t>(), t.defined() ? t.const_data_ptr<scalar_t>() : nullptr,
          g.defined() ? g.const_data_ptr<scalar_t>() : nullptr, p.defined() ? p.const_data_ptr<scalar_t>() : nullptr,
          o.mutable_data_ptr<scalar_t>(), has_prev ? partial.mutable_data_ptr<acc_t>() : nullptr, n,
          static_cast<acc_t>(gain));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!o.is_same(out)) out.copy_(o);
  if (!has_prev) return at::empty({0}, d.options());
  return partial.max().to(d.scalar_type());
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ep_kernels, CUDA, m) { m.impl("state_update", &cuda::state_update_cuda); }

}  // namespace ep_kernels
