// Torch-free interface of ppt_fast's CUDA kernels: descriptor structs and plain launchers.
//
// Why torch-free: a .cu that includes ATen's CUDA headers does not compile on the CI machine (its toolkit has no
// cusparse.h), so every kernel file includes only the CUDA runtime and this header, and is compile-checked there
// with `make check-cuda`. The torch binding (csrc/cuda/bindings.cpp, CUDA build only) fills the descriptor tables,
// copies them to the device and calls these launchers on the current stream.
//
// This header is plain C++ (no device code), so the host compiler can include it from bindings.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace ppt_fast {
namespace cuda {

// Element types a descriptor can name (one code per tensor, so one launch handles mixed-dtype lists).
enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Every per-tensor loop is flattened into fixed-size chunks; chunk c of the whole list belongs to the tensor t with
// chunk_begin[t] <= c < chunk_begin[t + 1] (found by binary search), so one grid-stride launch covers ~600 tensors
// of very different sizes with balanced blocks.
constexpr int64_t kSensChunk = 8192;    // elements per sensitivity chunk (256 threads x 8 elements x 4 in flight)
constexpr int64_t kSelectChunk = 16384; // elements per selection chunk (also the compaction's scan unit)

// ---------------------------------------------------------------------------------------------- sensitivity
struct SensTensor {
  void* score;         // fp32 or bf16, numel entries, updated in place
  const void* grad;    // fp32 / fp16 / bf16
  const void* param;   // same dtypes; only read by mode 2 (taylor), may be null otherwise
  int64_t numel;
  int64_t chunk_begin; // first global chunk of this tensor (prefix sum of ceil(numel / kSensChunk))
  int32_t score_dtype;
  int32_t grad_dtype;
  int32_t param_dtype;
  int32_t vec_ok;      // 1 when every pointer is 16-byte aligned: the 16-byte vector path is legal
};

// scores[t] += f(grads[t], params[t]) for every tensor, one launch. mode: 0 g^2, 1 |g|, 2 |g*theta|, 3 g.
// `d_tensors` is a device array of `num_tensors` descriptors; `total_chunks` = the last tensor's chunk_begin + its
// chunk count.
cudaError_t sensitivity_accumulate_launch(const SensTensor* d_tensors, int num_tensors, int64_t total_chunks, int mode,
                                          cudaStream_t stream);

// ---------------------------------------------------------------------------------------------- selection
struct ScoreTensor {
  const void* data;    // fp32 / fp16 / bf16
  int64_t numel;       // < 2^31 (local indices are int32)
  int64_t chunk_begin; // prefix sum of ceil(numel / kSelectChunk)
  int32_t dtype;
  int32_t vec_ok;      // 1 when data is 16-byte aligned
};

// Bytes of device scratch select_pivots_launch needs (histogram, radix state, per-chunk counts); O(N / 16384).
size_t select_pivots_workspace_bytes(int num_tensors, int64_t total_chunks);

// Global top-k by |score| (fp32 bit patterns), ties to the earliest (tensor, flat index).
// Writes d_counts[T] (int64, pivots per tensor) and d_indices[k] (int32 local flat indices, tensor-major,
// ascending within a tensor). *d_nan_flag (int32, device) becomes non-zero when any score is NaN; the caller reads
// it after the launch and raises (the outputs are then meaningless but stay within bounds).
// k must be in [1, N]. The workspace need not be zeroed by the caller.
cudaError_t select_pivots_launch(const ScoreTensor* d_tensors, int num_tensors, int64_t total_chunks, int64_t k,
                                 void* d_workspace, size_t workspace_bytes, int64_t* d_counts, int32_t* d_indices,
                                 int32_t* d_nan_flag, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------- sparse AdamW
struct AdamTensor {
  void* param;       // fp32 / fp16 / bf16 whole parameter, updated at its pivots
  const void* grad;  // dense gradient (same shape) or null when pivot_grads is given
  int64_t numel;     // entries of param (and grad): an index outside [0, numel) is never dereferenced
  int32_t param_dtype;
  int32_t grad_dtype;
};

// Scalars exactly as torch.optim.AdamW rounds them: Python doubles combined on the host, then cast to fp32.
struct AdamHyper {
  float decay;                  // 1 - lr * weight_decay
  float one_minus_beta1;        // the lerp weight of exp_avg.lerp_(g, 1 - beta1)
  float beta2;
  float one_minus_beta2;
  float eps;
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

// One AdamW step over k packed pivots of all tensors in one launch.
// d_offsets: device int64 [T + 1] (pivot j belongs to tensor t when offsets[t] <= j < offsets[t + 1]).
// d_master may be null (then fp32 params are read and written directly). d_pivot_grads (dtype pivot_grad_dtype)
// replaces the dense grads when non-null. d_grad_scale / d_found_inf / d_grad_coef: one fp32 each on the device, or
// null (g = grad / scale * coef; the step is skipped when *found_inf != 0).
// d_nonfinite (fp32, device) non-null makes it a checked step in two launches: the first gathers every gradient into
// d_scratch (fp32 [k], device) and sets *d_nonfinite = 1 on an inf/NaN; the second updates from d_scratch unless
// the flag is up. Nothing but the scratch and the flag is written by a skipped step.
cudaError_t sparse_adamw_step_launch(const AdamTensor* d_tensors, const int64_t* d_offsets, int num_tensors,
                                     const int32_t* d_indices, int64_t k, float* d_exp_avg, float* d_exp_avg_sq,
                                     float* d_master, const void* d_pivot_grads, int32_t pivot_grad_dtype,
                                     const float* d_grad_scale, const float* d_found_inf, const float* d_grad_coef,
                                     float* d_nonfinite, float* d_scratch, AdamHyper hyper, cudaStream_t stream);

}  // namespace cuda
}  // namespace ppt_fast
