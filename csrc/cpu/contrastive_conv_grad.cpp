// Contrastive conv weight update: grad_weight += scale * (dW(x_a, U(s_a)) - dW(x_b, U(s_b))),
// grad_bias += scale * (sum s_a - sum s_b), in place.
//
// Which path runs (a fixed rule):
//   - pool > 1, float32/float64: the sparse kernel of sparse_weight_grad.h, both states in
//     one pass over their argmax positions only (1/k^2 of the dense work), unless its padded
//     copy of x would be unreasonably large (sparse_wg::padded_copy_fits: legal but extreme
//     strides, paddings or dilations);
//   - otherwise (pool == 1, bfloat16/float16, such a geometry): ATen's convolution
//     weight-gradient per state, the same calls as the reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/sparse_weight_grad.h"

namespace ep_kernels {
namespace {

constexpr const char* kOp = "contrastive_conv_grad";

void contrastive_conv_grad_cpu(const at::Tensor& x_a, const at::Tensor& s_a, const at::Tensor& idx_a,
                               const at::Tensor& x_b, const at::Tensor& s_b, const at::Tensor& idx_b,
                               at::IntArrayRef conv_out_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, int64_t pool, double scale,
                               at::Tensor& grad_weight, const c10::optional<at::Tensor>& grad_bias) {
  checks::contrastive_conv_grad(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding, dilation, groups,
                                pool, scale, grad_weight, grad_bias);
  checks::on_device_type(kOp, grad_weight, "grad_weight", c10::DeviceType::CPU);
  if (pool > 1) {
    // Every index, also where the state is 0 (the kernels skip those positions).
    const std::pair<const at::Tensor*, const char*> indices[] = {{&idx_a, "idx_a"}, {&idx_b, "idx_b"}};
    for (const auto& [idx, name] : indices) {
      const auto ic = idx->contiguous();
      const int64_t bad = checks::first_index_outside_window(ic, conv_out_size[0], conv_out_size[1], pool);
      if (bad >= 0) checks::index_outside_window(kOp, name, ic, bad, conv_out_size[0], conv_out_size[1], pool);
    }
  }

  const bool has_bias = checks::present(grad_bias);
  const auto st = grad_weight.scalar_type();
  // c_in = cig * groups equals x_a.size(1): checks::contrastive_conv_grad checked it.
  const sparse_td::Geometry g = sparse_td::make_geometry(
      x_a.size(0), s_a.size(1), groups, grad_weight.size(1), x_a.size(2), x_a.size(3), conv_out_size, s_a.size(2),
      s_a.size(3), grad_weight.size(2), grad_weight.size(3), stride, padding, dilation, pool);
  bool sparse = false;
  if (pool > 1 && (st == at::kFloat || st == at::kDouble)) {
    AT_DISPATCH_FLOATING_TYPES(st, "contrastive_conv_grad_path", [&] { sparse = sparse_wg::padded_copy_fits<scalar_t>(g); });
  }
  if (sparse) {
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES(st, "contrastive_conv_grad_sparse", [&] {
      ok = sparse_wg::accumulate<scalar_t>(g, x_a, s_a, idx_a, x_b, s_b, idx_b, scale, grad_weight);
    });
    // Unreachable after the index check above; kept so the kernel never trusts its caller.
    TORCH_CHECK(ok, kOp, ": an index of idx_a or idx_b is outside its pooling window");
  } else {
    auto dw = [&](const at::Tensor& x, const at::Tensor& s, const at::Tensor& idx) {
      auto u = pool > 1 ? at::max_unpool2d(s, idx, conv_out_size) : s;
      auto res = at::convolution_backward(u, x, grad_weight, c10::nullopt, stride, padding, dilation, false,
                                          {0, 0}, groups, {false, true, false});
      return std::get<1>(res);
    };
    auto d = dw(x_a, s_a, idx_a) - dw(x_b, s_b, idx_b);
    grad_weight.add_(d, scale);
  }
  if (has_bias) {
    auto gb = *grad_bias;
    gb.add_(s_a.sum({0, 2, 3}) - s_b.sum({0, 2, 3}), scale);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) { m.impl("contrastive_conv_grad", &contrastive_conv_grad_cpu); }

}  // namespace ep_kernels
