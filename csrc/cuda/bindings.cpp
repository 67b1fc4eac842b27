// Torch binding of the CUDA kernels: the private ops ppt_fast::_<op>_cuda.
//
// Compiled only by the CUDA build (setup.py adds csrc/cuda/*.cpp with -DPPT_FAST_WITH_CUDA when torch is a CUDA build
// and a toolkit is present). It validates arguments (errors name the argument and the fix), fills the kernels'
// descriptor tables on the host, uploads them with one pinned, non-blocking copy on the current stream (the caching
// host allocator keeps the pinned block alive until that copy has run), and calls the torch-free launchers of
// csrc/cuda/*.cu on the current stream. The public ops and their checks live in ppt_fast/ops/*.py; these
// re-check only what would otherwise be memory-unsafe.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h), which keeps this file syntax-checkable against a
// CPU torch wheel plus a CUDA toolkit's include directory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.cuh"

namespace ppt_fast {
namespace {

namespace pc = ::ppt_fast::cuda;

int32_t dtype_code(const at::Tensor& t, const char* arg, int64_t i) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return pc::kF32;
    case at::kHalf:
      return pc::kF16;
    case at::kBFloat16:
      return pc::kBF16;
    default:
      TORCH_CHECK(false, arg, "[", i, "] has dtype ", t.scalar_type(), "; supported: float32, float16, bfloat16");
  }
  return pc::kF32;  // unreachable
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0u; }

void check_cuda_tensor(const at::Tensor& t, const at::Device& device, const char* arg, int64_t i) {
  TORCH_CHECK(t.is_cuda(), arg, "[", i, "] is on ", t.device(), ", not on a CUDA device; move it to ", device);
  TORCH_CHECK(t.device() == device, arg, "[", i, "] is on ", t.device(), " but the first tensor is on ", device,
              "; every tensor must be on one device");
}

// Host array of trivially copyable descriptors -> device bytes, one pinned non-blocking copy on the current stream.
template <typename T>
at::Tensor upload(const std::vector<T>& host, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(T));
  at::Tensor pinned = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(pinned.data_ptr(), host.data(), static_cast<size_t>(bytes));
  return pinned.to(device, at::kByte, /*non_blocking=*/true);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "ppt_fast: ", op, " CUDA kernel failed: ", cudaGetErrorString(err));
}

// ------------------------------------------------------------------------------------------------ sensitivity
void sensitivity_accumulate_cuda(at::TensorList scores, at::TensorList grads, at::TensorList params, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "mode=", mode, " must be 0 grad_sq, 1 grad_abs, 2 taylor or 3 sgd_delta");
  const int64_t n = static_cast<int64_t>(scores.size());
  if (n == 0) return;
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "grads has ", grads.size(), " tensors but scores has ", n,
              "; pass one per score");
  const bool need_params = mode == 2;
  TORCH_CHECK(!need_params || static_cast<int64_t>(params.size()) == n,
              "mode 2 (taylor) needs one param per score; got ", params.size(), " params for ", n, " scores");
  const at::Device device = scores[0].device();
  TORCH_CHECK(device.is_cuda(), "scores[0] is on ", device, "; the cuda backend needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);

  std::vector<at::Tensor> keep;  // contiguous copies of strided read-only inputs, alive until the launch is queued
  std::vector<pc::SensTensor> table;
  table.reserve(static_cast<size_t>(n));
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& s = scores[i];
    check_cuda_tensor(s, device, "scores", i);
    check_cuda_tensor(grads[i], device, "grads", i);
    TORCH_CHECK(s.is_contiguous(), "scores[", i, "] is not contiguous (it is updated in place); allocate it contiguous");
    TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16, "scores[", i, "] has dtype ",
                s.scalar_type(), "; scores must be float32 or bfloat16");
    TORCH_CHECK(grads[i].numel() == s.numel(), "grads[", i, "] has ", grads[i].numel(), " entries but scores[", i,
                "] has ", s.numel());
    if (s.numel() == 0) continue;
    at::Tensor g = grads[i].contiguous();
    pc::SensTensor d{};
    d.score = s.data_ptr();
    d.grad = g.data_ptr();
    d.numel = s.numel();
    d.chunk_begin = chunks;
    d.score_dtype = dtype_code(s, "scores", i);
    d.grad_dtype = dtype_code(g, "grads", i);
    d.param_dtype = pc::kF32;
    d.param = nullptr;
    bool vec = aligned16(d.score) && aligned16(d.grad);
    if (need_params) {
      check_cuda_tensor(params[i], device, "params", i);
      TORCH_CHECK(params[i].numel() == s.numel(), "params[", i, "] has ", params[i].numel(), " entries but scores[",
                  i, "] has ", s.numel());
      at::Tensor p = params[i].contiguous();
      d.param = p.data_ptr();
      d.param_dtype = dtype_code(p, "params", i);
      vec = vec && aligned16(d.param);
      keep.push_back(std::move(p));
    }
    d.vec_ok = vec ? 1 : 0;
    keep.push_back(std::move(g));
    chunks += (d.numel + pc::kSensChunk - 1) / pc::kSensChunk;
    table.push_back(d);
  }
  if (table.empty()) return;
  at::Tensor d_table = upload(table, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_launch(pc::sensitivity_accumulate_launch(reinterpret_cast<const pc::SensTensor*>(d_table.data_ptr()),
                                                 static_cast<int>(table.size()), chunks, static_cast<int>(mode),
                                                 stream),
               "sensitivity_accumulate");
  // `keep` and `d_table` are released to the caching allocator, which is stream-ordered: the memory is not
  // reused by another stream before this launch has run.
}

// ------------------------------------------------------------------------------------------------ selection
std::tuple<at::Tensor, at::Tensor> select_pivots_cuda(at::TensorList scores, int64_t k) {
  const int64_t n = static_cast<int64_t>(scores.size());
  TORCH_CHECK(n > 0, "scores is empty: the scope selected no tensors");
  TORCH_CHECK(n < (int64_t{1} << 31), "too many score tensors (", n, ")");
  const at::Device device = scores[0].device();
  TORCH_CHECK(device.is_cuda(), "scores[0] is on ", device, "; the cuda backend needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);

  std::vector<at::Tensor> keep;
  std::vector<pc::ScoreTensor> table(static_cast<size_t>(n));
  int64_t chunks = 0, total = 0;
  for (int64_t i = 0; i < n; ++i) {
    check_cuda_tensor(scores[i], device, "scores", i);
    at::Tensor s = scores[i].contiguous();
    TORCH_CHECK(s.numel() < (int64_t{1} << 31), "scores[", i, "] has ", s.numel(),
                " entries; pivot indices are int32, so one tensor may hold at most 2^31 - 1 (split it)");
    pc::ScoreTensor& d = table[static_cast<size_t>(i)];
    d.data = s.data_ptr();
    d.numel = s.numel();
    d.chunk_begin = chunks;  // empty tensors keep their slot (counts are indexed by position) but own no chunk
    d.dtype = dtype_code(s, "scores", i);
    d.vec_ok = aligned16(d.data) ? 1 : 0;
    chunks += (d.numel + pc::kSelectChunk - 1) / pc::kSelectChunk;
    total += d.numel;
    keep.push_back(std::move(s));
  }
  TORCH_CHECK(k >= 0 && k <= total, "k=", k, " must lie in [0, N] where N = ", total, " entries");
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(device));
  at::Tensor indices = at::empty({k}, at::TensorOptions().dtype(at::kInt).device(device));
  if (k == 0) return {counts, indices};

  at::Tensor d_table = upload(table, device);
  const size_t ws_bytes = pc::select_pivots_workspace_bytes(static_cast<int>(n), chunks);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  at::Tensor nan_flag = at::empty({1}, at::TensorOptions().dtype(at::kInt).device(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_launch(pc::select_pivots_launch(reinterpret_cast<const pc::ScoreTensor*>(d_table.data_ptr()),
                                        static_cast<int>(n), chunks, k, workspace.data_ptr(), ws_bytes,
                                        counts.data_ptr<int64_t>(), indices.data_ptr<int32_t>(),
                                        nan_flag.data_ptr<int32_t>(), stream),
               "select_pivots");
  // The one host synchronisation of the selection: NaN must become an error, not a silently wrong pivot set.
  TORCH_CHECK(nan_flag.item<int32_t>() == 0,
              "ppt_fast: NaN score in the sensitivity buffers; the gradients that fed them were NaN");
  return {counts, indices};
}

// ------------------------------------------------------------------------------------------------ sparse AdamW
void check_state(const at::Tensor& t, const at::Device& device, int64_t k, const char* arg) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == k &&
                  t.is_contiguous(),
              arg, " must be a contiguous float32 [", k, "] tensor on ", device, "; got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

const float* scalar_ptr(const std::optional<at::Tensor>& t, const at::Device& device, const char* arg) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, arg,
              " must be a one-element float32 tensor on ", device, " (as torch.amp.GradScaler makes)");
  return t->data_ptr<float>();
}

void sparse_adamw_step_cuda(at::TensorList params, at::TensorList grads, at::IntArrayRef offsets,
                            const at::Tensor& indices, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& pivot_grads,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::Tensor>& grad_coef, const std::optional<at::Tensor>& nonfinite,
                            double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == n + 1, "offsets has ", offsets.size(),
              " entries; expected len(params) + 1 = ", n + 1);
  TORCH_CHECK(step >= 1, "step must be >= 1 (the 1-based step count), got ", step);
  if (n == 0) return;
  const int64_t k = offsets[n];
  TORCH_CHECK(offsets[0] == 0, "offsets must start at 0");
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "params[0] is on ", device, "; the cuda backend needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(indices.device() == device && indices.scalar_type() == at::kInt && indices.dim() == 1 &&
                  indices.numel() == k && indices.is_contiguous(),
              "indices must be a contiguous int32 [", k, "] tensor on ", device);
  check_state(exp_avg, device, k, "exp_avg");
  check_state(exp_avg_sq, device, k, "exp_avg_sq");
  if (master.has_value()) check_state(*master, device, k, "master");
  const bool dense = !pivot_grads.has_value();
  TORCH_CHECK(dense == (grads.size() == static_cast<size_t>(n)),
              "give exactly one of grads (one per param) or pivot_grads; got ", grads.size(), " grads and ",
              pivot_grads.has_value() ? "a" : "no", " pivot_grads");
  int32_t pivot_grad_dtype = pc::kF32;
  at::Tensor pg;
  if (!dense) {
    TORCH_CHECK(pivot_grads->device() == device && pivot_grads->dim() == 1 && pivot_grads->numel() == k,
                "pivot_grads must be a [", k, "] tensor on ", device);
    pg = pivot_grads->contiguous();
    pivot_grad_dtype = dtype_code(pg, "pivot_grads", 0);
  }
  const float* d_scale = scalar_ptr(grad_scale, device, "grad_scale");
  const float* d_inf = scalar_ptr(found_inf, device, "found_inf");
  const float* d_coef = scalar_ptr(grad_coef, device, "grad_coef");
  float* d_nonfinite = const_cast<float*>(scalar_ptr(nonfinite, device, "nonfinite"));

  std::vector<at::Tensor> keep;
  std::vector<pc::AdamTensor> table(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_cuda_tensor(p, device, "params", i);
    TORCH_CHECK(p.is_contiguous(), "params[", i, "] is not contiguous (it is updated in place)");
    TORCH_CHECK(offsets[i + 1] >= offsets[i], "offsets must never decrease (use a PivotSet's offsets)");
    TORCH_CHECK(offsets[i + 1] - offsets[i] <= p.numel(), "tensor ", i, " has ", offsets[i + 1] - offsets[i],
                " pivots but params[", i, "] only ", p.numel(), " entries");
    pc::AdamTensor& d = table[static_cast<size_t>(i)];
    d.param = p.data_ptr();
    d.numel = p.numel();
    d.param_dtype = dtype_code(p, "params", i);
    d.grad = nullptr;
    d.grad_dtype = pc::kF32;
    if (dense) {
      check_cuda_tensor(grads[i], device, "grads", i);
      TORCH_CHECK(grads[i].numel() == p.numel(), "grads[", i, "] has ", grads[i].numel(), " entries but params[", i,
                  "] has ", p.numel());
      at::Tensor g = grads[i].contiguous();
      d.grad = g.data_ptr();
      d.grad_dtype = dtype_code(g, "grads", i);
      keep.push_back(std::move(g));
    }
  }
  if (k == 0) return;

  // Scalars rounded exactly as torch.optim.AdamW's single-tensor path rounds them: double math, then fp32.
  pc::AdamHyper h{};
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.step_size = static_cast<float>(lr / bias_correction1);
  h.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));

  at::Tensor d_table = upload(table, device);
  std::vector<int64_t> host_offsets(offsets.begin(), offsets.end());
  at::Tensor d_offsets = upload(host_offsets, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  // The checked step's fp32 gather scratch: from torch's caching allocator, so it costs no cudaMalloc per step.
  at::Tensor scratch = d_nonfinite != nullptr ? at::empty({k}, exp_avg.options()) : at::Tensor();
  check_launch(pc::sparse_adamw_step_launch(
                   reinterpret_cast<const pc::AdamTensor*>(d_table.data_ptr()),
                   reinterpret_cast<const int64_t*>(d_offsets.data_ptr()), static_cast<int>(n),
                   indices.data_ptr<int32_t>(), k, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                   master.has_value() ? master->data_ptr<float>() : nullptr, dense ? nullptr : pg.data_ptr(),
                   pivot_grad_dtype, d_scale, d_inf, d_coef, d_nonfinite,
                   d_nonfinite != nullptr ? scratch.data_ptr<float>() : nullptr, h, stream),
               "sparse_adamw_step");
}

}  // namespace
}  // namespace ppt_fast

// One fragment per file: the CPU schemas (_<op>_cpp) are defined in csrc/ppt_fast.cpp, the CUDA ones only here, so a
// CPU-only build never declares an op it cannot run.
TORCH_LIBRARY_FRAGMENT(ppt_fast, m) {
  m.def("_sensitivity_accumulate_cuda(Tensor(a!)[] scores, Tensor[] grads, Tensor[] params, int mode) -> ()");
  m.def("_select_pivots_cuda(Tensor[] scores, int k) -> (Tensor, Tensor)");
  m.def(
      "_sparse_adamw_step_cuda(Tensor(a!)[] params, Tensor[] grads, int[] offsets, Tensor indices, "
      "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!)? master, Tensor? pivot_grads, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? grad_coef, Tensor(e!)? nonfinite, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step) -> ()");
}

TORCH_LIBRARY_IMPL(ppt_fast, CUDA, m) {
  m.impl("_sensitivity_accumulate_cuda", &ppt_fast::sensitivity_accumulate_cuda);
  m.impl("_select_pivots_cuda", &ppt_fast::select_pivots_cuda);
  m.impl("_sparse_adamw_step_cuda", &ppt_fast::sparse_adamw_step_cuda);
}
