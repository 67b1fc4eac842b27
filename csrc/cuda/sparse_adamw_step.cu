// sparse_adamw_step: one AdamW step over the k packed pivots of all tensors, in one launch.
//
// Memory floor per pivot (~116 B on a GPU): m, v (and master) and the index stream coalesced (read 16-20 B, write
// 8-12 B), while the gradient and the parameter at a scattered pivot each cost a whole 32-byte sector (read g,
// read + write theta). So the kernel keeps everything per pivot in registers, touches each byte once, and hides the
// scattered latency with ILP: each thread owns kItems pivots (strided by the block size, so the state streams stay
// coalesced) and issues all of their loads before the first arithmetic.
//
// Tensor lookup: a block covers kItems * kThreads consecutive pivots; thread 0 binary-searches the owning tensors
// of the block's first and last pivot in `offsets`, and every thread then searches only that (usually 1-2 entry)
// range, so the per-pivot cost of the lookup is a couple of L1 hits.
//
// Numerics follow torch.optim.AdamW's single-tensor path operation by operation (fp32, scalars rounded to fp32 on
// the host as torch does): decay, lerp (as torch's fused-multiply-add form), mul + addcmul, sqrt / bc2 + eps,
// addcdiv. Explicit _rn intrinsics stop nvcc from contracting the steps torch rounds separately.
//
// Safety: a pivot whose index is outside [0, numel) of its tensor is never dereferenced (its θ and g accesses are
// masked off; its m and v are the packed state's own). The Python op refuses such indices before any launch; the
// mask is what keeps a raw call of the launcher inside its tensors.
//
// Checked steps (d_nonfinite given): a grid cannot wait for itself, so the gather + check runs as its own launch
// into an fp32 scratch, and the update launch reads the flag on the device and does nothing when it is up.
#include "common.cuh"

namespace ppt_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int64_t kPivotsPerBlock = static_cast<int64_t>(kThreads) * kItems;

// The t with offsets[t] <= j < offsets[t + 1], searched in [lo, hi] (empty tensors are skipped because the search
// returns the *last* t whose offset is <= j).
__device__ __forceinline__ int owner(const int64_t* __restrict__ offsets, int lo, int hi, int64_t j) {
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= j) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Phase 1 of a checked step: scratch[j] = grad at pivot j, unscaled and clipped; raise *nonfinite on inf/NaN.
__global__ void __launch_bounds__(kThreads)
    gather_check_kernel(const AdamTensor* __restrict__ tensors, const int64_t* __restrict__ offsets, int num_tensors,
                        const int32_t* __restrict__ indices, int64_t k, const void* __restrict__ pivot_grads,
                        int32_t pivot_grad_dtype, const float* __restrict__ grad_scale,
                        const float* __restrict__ found_inf, const float* __restrict__ grad_coef,
                        float* __restrict__ nonfinite, float* __restrict__ scratch) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  __shared__ int block_tensors[2];
  __shared__ int block_bad;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kPivotsPerBlock;
  const int64_t j_last = (j0 + kPivotsPerBlock < k ? j0 + kPivotsPerBlock : k) - 1;
  if (threadIdx.x == 0) {
    block_tensors[0] = owner(offsets, 0, num_tensors - 1, j0);
    block_tensors[1] = owner(offsets, block_tensors[0], num_tensors - 1, j_last);
    block_bad = 0;
  }
  __syncthreads();
  const float scale = grad_scale != nullptr ? *grad_scale : 1.f;
  const float coef = grad_coef != nullptr ? *grad_coef : 1.f;
  bool bad = false;
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    const int64_t j = j0 + static_cast<int64_t>(u) * kThreads + threadIdx.x;
    if (j >= k) continue;
    float g = 0.f;
    if (pivot_grads != nullptr) {
      g = detail::load_as_float(pivot_grads, j, pivot_grad_dtype);
    } else {
      const int32_t idx = __ldcs(indices + j);
      const AdamTensor& d = tensors[owner(offsets, block_tensors[0], block_tensors[1], j)];
      if (idx >= 0 && idx < d.numel) g = detail::load_as_float(d.grad, idx, d.grad_dtype);
    }
    if (grad_scale != nullptr) g = __fdiv_rn(g, scale);
    if (grad_coef != nullptr) g = __fmul_rn(g, coef);
    scratch[j] = g;
    const float probe = __fmul_rn(g, 0.f);  // 0 for finite g, NaN for inf/NaN (and NaN != NaN)
    bad |= probe != probe;
  }
  if (bad) block_bad = 1;  // benign race: every writer stores the same value
  __syncthreads();
  if (threadIdx.x == 0 && block_bad) *nonfinite = 1.f;
}

__global__ void __launch_bounds__(kThreads)
    sparse_adamw_kernel(const AdamTensor* __restrict__ tensors, const int64_t* __restrict__ offsets, int num_tensors,
                        const int32_t* __restrict__ indices, int64_t k, float* __restrict__ exp_avg,
                        float* __restrict__ exp_avg_sq, float* __restrict__ master,
                        const void* __restrict__ pivot_grads, int32_t pivot_grad_dtype,
                        const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                        const float* __restrict__ grad_coef, const float* __restrict__ skip_flag, AdamHyper h) {
  // GradScaler protocol (found_inf) and the checked step's own flag: the whole step is skipped when an inf/NaN was
  // found. Read on the device, so the caller never synchronises.
  if (found_inf != nullptr && *found_inf != 0.f) return;
  if (skip_flag != nullptr && *skip_flag != 0.f) return;
  __shared__ int block_tensors[2];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kPivotsPerBlock;
  const int64_t j_last = (j0 + kPivotsPerBlock < k ? j0 + kPivotsPerBlock : k) - 1;
  if (threadIdx.x == 0) {
    block_tensors[0] = owner(offsets, 0, num_tensors - 1, j0);
    block_tensors[1] = owner(offsets, block_tensors[0], num_tensors - 1, j_last);
  }
  __syncthreads();
  const int t_lo = block_tensors[0], t_hi = block_tensors[1];
  const float scale = grad_scale != nullptr ? *grad_scale : 1.f;
  const float coef = grad_coef != nullptr ? *grad_coef : 1.f;

  int64_t j[kItems];
  int32_t idx[kItems];
  int t[kItems];
  float g[kItems], theta[kItems], m[kItems], v[kItems];
  bool live[kItems], inside[kItems];
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    j[u] = j0 + static_cast<int64_t>(u) * kThreads + threadIdx.x;
    live[u] = j[u] < k;
    idx[u] = live[u] ? __ldcs(indices + j[u]) : 0;
    t[u] = live[u] ? owner(offsets, t_lo, t_hi, j[u]) : t_lo;
    inside[u] = live[u] && idx[u] >= 0 && idx[u] < tensors[t[u]].numel;
  }
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    if (!live[u]) continue;
    const AdamTensor& d = tensors[t[u]];
    g[u] = pivot_grads != nullptr ? detail::load_as_float(pivot_grads, j[u], pivot_grad_dtype)
           : inside[u]            ? detail::load_as_float(d.grad, idx[u], d.grad_dtype)
                                  : 0.f;
    theta[u] = master != nullptr ? master[j[u]]
               : inside[u]       ? detail::load_as_float(d.param, idx[u], d.param_dtype)
                                 : 0.f;
    m[u] = exp_avg[j[u]];
    v[u] = exp_avg_sq[j[u]];
  }
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    if (!live[u]) continue;
    float gu = g[u];
    if (grad_scale != nullptr) gu = __fdiv_rn(gu, scale);
    if (grad_coef != nullptr) gu = __fmul_rn(gu, coef);
    float th = __fmul_rn(theta[u], h.decay);
    // torch's lerp: weight < 0.5 -> fma(w, end - self, self), else fma(w - 1, end - self, end)
    const float diff = __fsub_rn(gu, m[u]);
    const float mu = h.one_minus_beta1 < 0.5f ? __fmaf_rn(h.one_minus_beta1, diff, m[u])
                                              : __fmaf_rn(__fsub_rn(h.one_minus_beta1, 1.f), diff, gu);
    const float vu = __fadd_rn(__fmul_rn(v[u], h.beta2), __fmul_rn(__fmul_rn(h.one_minus_beta2, gu), gu));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vu), h.bias_correction2_sqrt), h.eps);
    th = __fadd_rn(th, __fmul_rn(-h.step_size, __fdiv_rn(mu, denom)));
    exp_avg[j[u]] = mu;
    exp_avg_sq[j[u]] = vu;
    if (master != nullptr) master[j[u]] = th;
    const AdamTensor& d = tensors[t[u]];
    if (inside[u]) detail::store_from_float(d.param, idx[u], d.param_dtype, th);
  }
}

}  // namespace

cudaError_t sparse_adamw_step_launch(const AdamTensor* d_tensors, const int64_t* d_offsets, int num_tensors,
                                     const int32_t* d_indices, int64_t k, float* d_exp_avg, float* d_exp_avg_sq,
                                     float* d_master, const void* d_pivot_grads, int32_t pivot_grad_dtype,
                                     const float* d_grad_scale, const float* d_found_inf, const float* d_grad_coef,
                                     float* d_nonfinite, float* d_scratch, AdamHyper hyper, cudaStream_t stream) {
  if (k <= 0 || num_tensors <= 0) return cudaSuccess;
  const int64_t blocks = (k + kPivotsPerBlock - 1) / kPivotsPerBlock;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  if (d_nonfinite != nullptr) {
    if (d_scratch == nullptr) return cudaErrorInvalidValue;
    PPT_LAUNCH(gather_check_kernel, static_cast<unsigned>(blocks), kThreads, stream,
        d_tensors, d_offsets, num_tensors, d_indices, k, d_pivot_grads, pivot_grad_dtype, d_grad_scale, d_found_inf,
        d_grad_coef, d_nonfinite, d_scratch);
    // No error check between the two: a failed launch's error stays until cudaGetLastError reads it below.
    PPT_LAUNCH(sparse_adamw_kernel, static_cast<unsigned>(blocks), kThreads, stream,
        d_tensors, d_offsets, num_tensors, d_indices, k, d_exp_avg, d_exp_avg_sq, d_master,
        static_cast<const void*>(d_scratch), static_cast<int32_t>(kF32), static_cast<const float*>(nullptr),
        d_found_inf, static_cast<const float*>(nullptr), static_cast<const float*>(d_nonfinite), hyper);
    return cudaGetLastError();
  }
  PPT_LAUNCH(sparse_adamw_kernel, static_cast<unsigned>(blocks), kThreads, stream,
      d_tensors, d_offsets, num_tensors, d_indices, k, d_exp_avg, d_exp_avg_sq, d_master, d_pivot_grads,
      pivot_grad_dtype, d_grad_scale, d_found_inf, d_grad_coef, static_cast<const float*>(nullptr), hyper);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ppt_fast
