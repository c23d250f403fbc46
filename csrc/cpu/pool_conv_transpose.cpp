// Top-down through a max-pool and a conv: W^T * U(s).
//
// Which path runs (a fixed rule, not a fallback on failure):
//   - pool > 1, float32/float64: the sparse kernel of sparse_top_down.h (only the argmax
//     positions: 1/k^2 of the dense work), any stride/padding/dilation/groups, with the weight
//     packed once per weight (packed_weight_cache.h), unless the input is too large for its
//     32-bit offsets (sparse_td::offsets_fit);
//   - otherwise (pool == 1: nothing is sparse; bfloat16/float16; such a large input): ATen's
//     max-unpool and the convolution's input-gradient (the dense transposed convolution).
// Every index must lie inside its own pooling window, on every path (ValueError otherwise).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/packed_weight_cache.h"
#include "cpu/sparse_top_down.h"

namespace ep_kernels {
namespace {

constexpr const char* kOp = "pool_conv_transpose";

at::Tensor packed_weight(const at::Tensor& weight) {
  static cpu::PackedWeightCache cache;
  return cache.get(weight, [](const at::Tensor& w) {
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pack_top_down_weight", [&] { out = sparse_td::pack_weight<scalar_t>(w); });
    return out;
  });
}

at::Tensor pool_conv_transpose_cpu(const at::Tensor& s, const at::Tensor& indices, const at::Tensor& weight,
                                   at::IntArrayRef input_size, at::IntArrayRef conv_out_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, int64_t pool) {
  checks::pool_conv_transpose(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool);
  checks::on_device_type(kOp, s, "s", c10::DeviceType::CPU);
  bool sparse = false;
  if (pool > 1 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble)) {
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "pool_conv_transpose_path", [&] {
      sparse = sparse_td::offsets_fit<scalar_t>(input_size[0], input_size[1], weight.size(1));
    });
  }
  if (sparse) {
    // The sparse kernel checks every index while it builds its lists.
    return sparse_td::pool_conv_transpose(s, indices, weight, input_size, conv_out_size, stride, padding, dilation,
                                          groups, pool, packed_weight(weight));
  }
  at::Tensor u = s;
  if (pool > 1) {
    const auto idx = indices.contiguous();
    const int64_t bad = checks::first_index_outside_window(idx, conv_out_size[0], conv_out_size[1], pool);
    if (bad >= 0) checks::index_outside_window(kOp, "indices", idx, bad, conv_out_size[0], conv_out_size[1], pool);
    u = at::max_unpool2d(s, idx, conv_out_size);
  }
  std::vector<int64_t> in_shape = {s.size(0), weight.size(1) * groups, input_size[0], input_size[1]};
  auto out = at::convolution_backward(u, at::empty(in_shape, s.options()), weight, c10::nullopt, stride, padding,
                                      dilation, false, {0, 0}, groups, {true, false, false});
  return std::get<0>(out).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) { m.impl("pool_conv_transpose", &pool_conv_transpose_cpu); }

}  // namespace ep_kernels
