// Top-down through a max-pool and a conv: W^T * U(s).
//
// Which path runs (a fixed rule, not a fallback on failure):
//   - pool > 1, float32/float64: the sparse kernel of sparse_top_down.h (only the argmax
//     positions: 1/k^2 of the dense work), any stride/padding/dilation/groups;
//   - pool == 1 (nothing is sparse) or bfloat16/float16: ATen's max-unpool and the
//     convolution's input-gradient (the dense transposed convolution).
// packed_weight (optional, from pack_top_down_weight) is the sparse kernel's weight layout; the
// caller promises it is the packing of this weight. The dense paths ignore it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "sparse_top_down.h"

namespace ep_kernels {
namespace {

constexpr const char* kOp = "pool_conv_transpose";

at::Tensor pool_conv_transpose_cpu(const at::Tensor& s, const at::Tensor& indices, const at::Tensor& weight,
                                   at::IntArrayRef input_size, at::IntArrayRef conv_out_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, int64_t pool, const c10::optional<at::Tensor>& packed_weight) {
  check_cpu(s, kOp, "s");
  check_cpu(weight, kOp, "weight");
  check_pool_conv_transpose_shapes(s, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool,
                                   kOp);
  if (pool > 1) check_index_tensor(indices, s, kOp, "indices", "s");

  if (pool > 1 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble)) {
    at::Tensor packed;
    if (packed_weight.has_value() && packed_weight->defined()) {
      packed = *packed_weight;
      check_cpu(packed, kOp, "packed_weight");
      check_same_dtype(packed, weight, kOp, "packed_weight", "weight");
      const int64_t cw = s.scalar_type() == at::kFloat ? sparse_td::chunk_width<float>(weight.size(1))
                                                       : sparse_td::chunk_width<double>(weight.size(1));
      const int64_t expected =
          sparse_td::packed_numel(weight.size(0), weight.size(1), weight.size(2) * weight.size(3), cw);
      TORCH_CHECK(packed.dim() == 1 && packed.numel() == expected, kOp, ": packed_weight has shape ",
                  packed.sizes(), " but the packing of a weight of shape ", weight.sizes(), " has ", expected,
                  " elements (make it with pack_top_down_weight(weight))");
    }
    return sparse_td::pool_conv_transpose(s, indices, weight, input_size, conv_out_size, stride, padding, dilation,
                                          groups, pool, packed);
  }
  at::Tensor u = s;
  if (pool > 1) u = at::max_unpool2d(s, indices, conv_out_size);
  std::vector<int64_t> in_shape = {s.size(0), weight.size(1) * groups, input_size[0], input_size[1]};
  auto out = at::convolution_backward(u, at::empty(in_shape, s.options()), weight, c10::nullopt, stride, padding,
                                      dilation, false, {0, 0}, groups, {true, false, false});
  return std::get<0>(out).contiguous();
}

at::Tensor pack_top_down_weight_cpu(const at::Tensor& weight) {
  constexpr const char* op = "pack_top_down_weight";
  check_cpu(weight, op, "weight");
  check_dim(weight, 4, op, "weight");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
              ": weight must be float32 or float64 (other dtypes take the dense path, which needs no packing), got ",
              weight.scalar_type());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pack_top_down_weight", [&] {
    out = sparse_td::pack_weight<scalar_t>(weight);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_kernels, CPU, m) {
  m.impl("pool_conv_transpose", &pool_conv_transpose_cpu);
  m.impl("pack_top_down_weight", &pack_top_down_weight_cpu);
}

}  // namespace ep_kernels
