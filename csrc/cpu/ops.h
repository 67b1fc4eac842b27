// CPU kernels of ppt_fast's three ops (registered as ppt_fast::_<op>_cpp in csrc/ppt_fast.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace ppt_fast {

void sensitivity_accumulate_cpp(at::TensorList scores, at::TensorList grads, at::TensorList params, int64_t mode);

std::tuple<at::Tensor, at::Tensor> select_pivots_cpp(at::TensorList scores, int64_t k);

void sparse_adamw_step_cpp(
    at::TensorList params,
    at::TensorList grads,
    at::IntArrayRef offsets,
    const at::Tensor& indices,
    const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq,
    const std::optional<at::Tensor>& master,
    const std::optional<at::Tensor>& pivot_grads,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& grad_coef,
    const std::optional<at::Tensor>& nonfinite,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    int64_t step,
    const std::optional<at::Tensor>& workspace);

at::Tensor pivot_grad_norm_cpp(
    at::TensorList grads,
    at::IntArrayRef offsets,
    const at::Tensor& indices,
    const std::optional<at::Tensor>& pivot_grads,
    double norm_type);

}  // namespace ppt_fast
