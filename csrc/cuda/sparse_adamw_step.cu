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

__global__ void __launch_bounds__(kThreads)
    sparse_adamw_kernel(const AdamTensor* __restrict__ tensors, const int64_t* __restrict__ offsets, int num_tensors,
                        const int32_t* __restrict__ indices, int64_t k, float* __restrict__ exp_avg,
                        float* __restrict__ exp_avg_sq, float* __restrict__ master,
                        const void* __restrict__ pivot_grads, int32_t pivot_grad_dtype,
                        const float* __restrict__ grad_scale, const float* __restrict__ found_inf, AdamHyper h) {
  // GradScaler protocol: the whole step is skipped when an inf/NaN was found. Read on the device, so the caller
  // never synchronises.
  if (found_inf != nullptr && *found_inf != 0.f) return;
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

  int64_t j[kItems];
  int32_t idx[kItems];
  int t[kItems];
  float g[kItems], theta[kItems], m[kItems], v[kItems];
  bool live[kItems];
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    j[u] = j0 + static_cast<int64_t>(u) * kThreads + threadIdx.x;
    live[u] = j[u] < k;
    idx[u] = live[u] ? __ldcs(indices + j[u]) : 0;
    t[u] = live[u] ? owner(offsets, t_lo, t_hi, j[u]) : t_lo;
  }
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    if (!live[u]) continue;
    const AdamTensor& d = tensors[t[u]];
    g[u] = pivot_grads != nullptr ? detail::load_as_float(pivot_grads, j[u], pivot_grad_dtype)
                                  : detail::load_as_float(d.grad, idx[u], d.grad_dtype);
    theta[u] = master != nullptr ? master[j[u]] : detail::load_as_float(d.param, idx[u], d.param_dtype);
    m[u] = exp_avg[j[u]];
    v[u] = exp_avg_sq[j[u]];
  }
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    if (!live[u]) continue;
    float gu = g[u];
    if (grad_scale != nullptr) gu = __fdiv_rn(gu, scale);
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
    detail::store_from_float(d.param, idx[u], d.param_dtype, th);
  }
}

}  // namespace

cudaError_t sparse_adamw_step_launch(const AdamTensor* d_tensors, const int64_t* d_offsets, int num_tensors,
                                     const int32_t* d_indices, int64_t k, float* d_exp_avg, float* d_exp_avg_sq,
                                     float* d_master, const void* d_pivot_grads, int32_t pivot_grad_dtype,
                                     const float* d_grad_scale, const float* d_found_inf, AdamHyper hyper,
                                     cudaStream_t stream) {
  if (k <= 0 || num_tensors <= 0) return cudaSuccess;
  const int64_t blocks = (k + kPivotsPerBlock - 1) / kPivotsPerBlock;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  PPT_LAUNCH(sparse_adamw_kernel, static_cast<unsigned>(blocks), kThreads, stream,
      d_tensors, d_offsets, num_tensors, d_indices, k, d_exp_avg, d_exp_avg_sq, d_master, d_pivot_grads,
      pivot_grad_dtype, d_grad_scale, d_found_inf, hyper);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ppt_fast
