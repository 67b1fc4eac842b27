// The compiled extension ppt_fast._C: the private CPU ops ppt_fast::_<op>_cpp.
//
// The public ops (ppt_fast::sensitivity_accumulate, ::select_pivots_packed, ::sparse_adamw_step) are defined in
// Python (ppt_fast/ops/*.py) and call these private ones through the backend selector, so Python and C++ never own
// the same dispatch key. The CUDA kernels register ppt_fast::_<op>_cuda from csrc/cuda/bindings.cpp.

#include <Python.h>
#include <torch/library.h>

#include "cpu/ops.h"

extern "C" {
// `import ppt_fast._C` only has to load this library (which runs the registrations below); the module itself is
// empty, as in pytorch/extension-cpp.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      nullptr,  // m_doc
      -1,  // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_FRAGMENT(ppt_fast, m) {
  m.def("_sensitivity_accumulate_cpp(Tensor(a!)[] scores, Tensor[] grads, Tensor[] params, int mode) -> ()");
  m.def("_select_pivots_cpp(Tensor[] scores, int k) -> (Tensor, Tensor)");
  m.def(
      "_sparse_adamw_step_cpp(Tensor(a!)[] params, Tensor[] grads, int[] offsets, Tensor indices, "
      "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!)? master, Tensor? pivot_grads, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? grad_coef, Tensor(e!)? nonfinite, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, Tensor(f!)? workspace=None) -> ()");
  m.def(
      "_pivot_grad_norm_cpp(Tensor[] grads, int[] offsets, Tensor indices, Tensor? pivot_grads, "
      "float norm_type) -> Tensor");
}

TORCH_LIBRARY_IMPL(ppt_fast, CPU, m) {
  m.impl("_sensitivity_accumulate_cpp", &ppt_fast::sensitivity_accumulate_cpp);
  m.impl("_select_pivots_cpp", &ppt_fast::select_pivots_cpp);
  m.impl("_sparse_adamw_step_cpp", &ppt_fast::sparse_adamw_step_cpp);
  m.impl("_pivot_grad_norm_cpp", &ppt_fast::pivot_grad_norm_cpp);
}
