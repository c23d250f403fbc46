// Contrastive conv weight update: grad_weight += scale * (dW(x_a, U(s_a)) - dW(x_b, U(s_b))),
// grad_bias += scale * (sum s_a - sum s_b), in place.
//
// Which path runs (a fixed rule):
//   - pool > 1, float32/float64: the sparse kernel of sparse_weight_grad.h, both states in
//     one pass over their argmax positions only (1/k^2 of the dense work);
//   - pool == 1 or bfloat16/float16: ATen's convolution weight-gradient per state, the same
//     calls as the reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "sparse_weight_grad.h"

namespace ep_kernels {
namespace {

constexpr const char* kOp = "contrastive_conv_grad";

void contrastive_conv_grad_cpu(const at::Tensor& x_a, const at::Tensor& s_a, const at::Tensor& idx_a,
                               const at::Tensor& x_b, const at::Tensor& s_b, const at::Tensor& idx_b,
                               at::IntArrayRef conv_out_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, int64_t pool, double scale,
                               at::Tensor& grad_weight, const c10::optional<at::Tensor>& grad_bias) {
  check_cpu(grad_weight, kOp, "grad_weight");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&x_a, "x_a"}, {&s_a, "s_a"}, {&x_b, "x_b"},
                                {&s_b, "s_b"}}) {
    check_cpu(*t, kOp, name);
  }
  check_contrastive_shapes(x_a, s_a, x_b, s_b, grad_weight, conv_out_size, stride, padding, dilation, groups, pool,
                           kOp);
  if (pool > 1) {
    check_index_tensor(idx_a, s_a, kOp, "idx_a", "s_a");
    check_index_tensor(idx_b, s_b, kOp, "idx_b", "s_b");
  }
  if (grad_bias.has_value() && grad_bias->defined()) {
    check_cpu(*grad_bias, kOp, "grad_bias");
    check_dim(*grad_bias, 1, kOp, "grad_bias");
    check_same_dtype(*grad_bias, grad_weight, kOp, "grad_bias", "grad_weight");
    TORCH_CHECK(grad_bias->size(0) == grad_weight.size(0), kOp, ": grad_bias has ", grad_bias->size(0),
                " entries for ", grad_weight.size(0), " output channels");
  }

  const bool has_bias = grad_bias.has_value() && grad_bias->defined();
  const auto st = grad_weight.scalar_type();
  if (pool > 1 && (st == at::kFloat || st == at::kDouble)) {
    // c_in = cig * groups equals x_a.size(1): check_contrastive_shapes checked it.
    sparse_td::Geometry g = sparse_td::make_geometry(
        x_a.size(0), s_a.size(1), groups, grad_weight.size(1), x_a.size(2), x_a.size(3), conv_out_size, s_a.size(2),
        s_a.size(3), grad_weight.size(2), grad_weight.size(3), stride, padding, dilation, pool);
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES(st, "contrastive_conv_grad_sparse", [&] {
      ok = sparse_wg::accumulate<scalar_t>(g, x_a, s_a, idx_a, x_b, s_b, idx_b, scale, grad_weight);
    });
    TORCH_CHECK(ok, kOp, ": an index of idx_a or idx_b is outside its ", pool, "x", pool,
                " pooling window (indices must come from a max-pool of stride ", pool, " over the ",
                conv_out_size[0], "x", conv_out_size[1], " convolution output); grad_weight was not modified");
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
