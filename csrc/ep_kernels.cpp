// Op schemas of ep_kernels, registered with the PyTorch dispatcher.
// One name per op serves every device; each backend registers its kernels in its own file
// (cpu/*.cpp, cuda/*.cu) with TORCH_LIBRARY_IMPL; every kernel first checks the op's contract
// (checks.h, the same as the Python meta functions of ep_kernels/ops/_meta.py).
#include <Python.h>
#include <torch/library.h>

// Importing ep_kernels._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ep_kernels, m) {
  // The fake (meta) kernels are Python, registered (torch.library.register_fake) by this
  // module; torch imports it when a fake kernel is needed and checks that they come from it.
  m.set_python_module("ep_kernels.ops._library");
  m.def(
      "conv_pool_drive(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int pool) -> (Tensor, Tensor)");
  m.def(
      "pool_conv_transpose(Tensor s, Tensor indices, Tensor weight, int[2] input_size, "
      "int[2] conv_out_size, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int pool) -> Tensor");
  m.def(
      "state_update(Tensor drive, Tensor? top_down, Tensor? nudge, Tensor? prev, float gain, "
      "Tensor(a!) out) -> Tensor");
  m.def(
      "contrastive_conv_grad(Tensor x_a, Tensor s_a, Tensor idx_a, Tensor x_b, Tensor s_b, "
      "Tensor idx_b, int[2] conv_out_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int pool, float scale, Tensor(a!) grad_weight, Tensor(b!)? grad_bias) -> ()");
}
