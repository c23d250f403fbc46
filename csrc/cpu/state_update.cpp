// Fused state update: out = clamp(gain * (drive + top_down + nudge), 0, 1), and the
// max |out - prev| in the same pass (the convergence residual), so a relaxation step
// reads each operand once and writes the state once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ep_kernels {
namespace {

template <typename scalar_t, typename acc_t>
acc_t state_update_loop(const scalar_t* drive, const scalar_t* td, const scalar_t* nudge,
                        const scalar_t* prev, scalar_t* out, int64_t n, acc_t gain) {
  // Per-chunk maxima, then a serial max: deterministic and race-free.
  const int64_t grain = 1 << 14;
  const int64_t nchunks = std::max<int64_t>(1, (n + grain - 1) / grain);
  std::vector<acc_t> chunk_max(nchunks, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * grain, i1 = std::min(n, i0 + grain);
      acc_t m = 0;
      bool nan = false;
      for (int64_t i = i0; i < i1; ++i) {
        acc_t v = static_cast<acc_t>(drive[i]);
        if (td) v += static_cast<acc_t>(td[i]);
        if (nudge) v += static_cast<acc_t>(nudge[i]);
        v *= gain;
        // NaN must survive the clamp so that divergence is detected by the caller.
        acc_t s = std::isnan(v) ? v : std::min(std::max(v, acc_t(0)), acc_t(1));
        out[i] = static_cast<scalar_t>(s);
        if (prev) {
          acc_t d = std::abs(static_cast<acc_t>(out[i]) - static_cast<acc_t>(prev[i]));
          if (std::isnan(d)) nan = true;
          m = std::max(m, d);
        }
      }
      chunk_max[c] = nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
    }
  });
  acc_t m = 0;
  for (acc_t v : chunk_max) {
    if (std::isnan(v)) return v;
    m = std::max(m, v);
  }
  return m;
}

void check_operand(const at::Tensor& t, const at::Tensor& drive, const char* name) {
  TORCH_CHECK(t.device() == drive.device(), "state_update: ", name, " is on ", t.device(),
              " but drive is on ", drive.device());
  TORCH_CHECK(t.scalar_type() == drive.scalar_type(), "state_update: ", name, " has dtype ",
              t.scalar_type(), " but drive has ", drive.scalar_type());
  TORCH_CHECK(t.sizes() == drive.sizes(), "state_update: ", name, " has shape ", t.sizes(),
              " but drive has ", drive.sizes());
}

at::Tensor state_update_cpu(const at::Tensor& drive, const c10::optional<at::Tensor>& top_down,
                            const c10::optional<at::Tensor>& nudge,
                            const c10::optional<at::Tensor>& prev, double gain, at::Tensor& out) {
  TORCH_CHECK(drive.device().is_cpu(), "state_update (cpu): drive must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(drive.scalar_type()), "state_update: drive must be floating point, got ",
              drive.scalar_type());
  check_operand(out, drive, "out");
  TORCH_CHECK(out.is_contiguous(), "state_update: out must be contiguous");
  if (top_down) check_operand(*top_down, drive, "top_down");
  if (nudge) check_operand(*nudge, drive, "nudge");
  if (prev) {
    check_operand(*prev, drive, "prev");
    TORCH_CHECK(!prev->is_same(out) && prev->data_ptr() != out.data_ptr(),
                "state_update: out must not alias prev");
  }
  auto d = drive.contiguous();
  auto t = top_down ? top_down->contiguous() : at::Tensor();
  auto g = nudge ? nudge->contiguous() : at::Tensor();
  auto p = prev ? prev->contiguous() : at::Tensor();
  const int64_t n = d.numel();
  at::Tensor change;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, d.scalar_type(), "state_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t m = state_update_loop<scalar_t, acc_t>(
        d.const_data_ptr<scalar_t>(), t.defined() ? t.const_data_ptr<scalar_t>() : nullptr,
        g.defined() ? g.const_data_ptr<scalar_t>() : nullptr,
        p.defined() ? p.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), n,
        static_cast<acc_t>(gain));
    change = p.defined() ? at::scalar_tensor(m, d.options()) : at::empty({0}, d.options());
  });
  return change;
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) { m.impl("state_update", &state_update_cpu); }

}  // namespace ep_kernels
