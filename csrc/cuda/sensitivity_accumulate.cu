// sensitivity_accumulate: scores[t] += f(grads[t], params[t]) for every tensor t, in one streaming launch.
//
// Memory-bound: per element we must read g (+ theta for taylor) and read + write the score, nothing more. The
// kernel therefore
//   - walks a flattened chunk table of all tensors with a grid-stride loop (a persistent grid sized to the GPU, so
//     ~600 tensors of very different sizes cost one launch and no tail of idle blocks),
//   - uses 16-byte vector accesses where the tensor's pointers are aligned (every thread moves 8 elements per
//     vector, 4 vectors in flight before the first use),
//   - loads gradients with the streaming hint (read once) so they do not evict the scores from L2,
//   - specialises on the dtype triple at run time per chunk (uniform across the block, so no divergence) and on
//     the mode at launch time.
// Numerics match the reference exactly: f is computed in fp32 with explicit round-to-nearest intrinsics (no FMA
// contraction of score + g*g), then rounded once into the score's dtype.
#include "common.cuh"

namespace ppt_fast {
namespace cuda {
namespace {

using detail::Elem;

constexpr int kThreads = 256;
constexpr int kVec = 8;                                      // elements per vector access
constexpr int kUnroll = static_cast<int>(kSensChunk / (kThreads * kVec));  // vectors in flight per thread
static_assert(kUnroll * kThreads * kVec == kSensChunk, "a chunk is exactly one unrolled pass of the block");

template <int kMode>
__device__ __forceinline__ float contribution(float g, float p) {
  if constexpr (kMode == 0) {
    return __fmul_rn(g, g);
  } else if constexpr (kMode == 1) {
    return fabsf(g);
  } else if constexpr (kMode == 2) {
    return fabsf(__fmul_rn(g, p));
  } else {
    return g;
  }
}

// One chunk [begin, end) of one tensor. `vec` selects the 16-byte path (begin is a multiple of kSensChunk, hence of
// 8, so alignment of the base pointers carries over to every vector).
template <int kMode, typename S, typename G, typename P>
__device__ __forceinline__ void process_chunk(const SensTensor& t, int64_t begin, int64_t end) {
  S* __restrict__ score = static_cast<S*>(t.score);
  const G* __restrict__ grad = static_cast<const G*>(t.grad);
  const P* __restrict__ param = static_cast<const P*>(t.param);
  constexpr bool kNeedParam = kMode == 2;

  if (t.vec_ok && end - begin == kSensChunk) {
    // Full aligned chunk: all loads of the chunk's 4 vectors issued before any arithmetic.
    float g[kUnroll][kVec], s[kUnroll][kVec], p[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = begin + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * kVec;
      detail::load8<G, true>(grad + i, g[u]);
      detail::load8<S, false>(score + i, s[u]);
      if constexpr (kNeedParam) detail::load8<P, true>(param + i, p[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float pv = kNeedParam ? p[u][e] : 0.f;
        s[u][e] = __fadd_rn(s[u][e], contribution<kMode>(g[u][e], pv));
      }
      const int64_t i = begin + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * kVec;
      detail::store8<S>(score + i, s[u]);
    }
    return;
  }
  // Tail chunk or misaligned tensor: scalar, still coalesced across the warp.
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float gv = Elem<G>::to_float(grad[i]);
    const float pv = kNeedParam ? Elem<P>::to_float(param[i]) : 0.f;
    const float sv = Elem<S>::to_float(score[i]);
    score[i] = Elem<S>::from_float(__fadd_rn(sv, contribution<kMode>(gv, pv)));
  }
}

template <int kMode, typename S, typename G>
__device__ __forceinline__ void dispatch_param(const SensTensor& t, int64_t begin, int64_t end) {
  if constexpr (kMode == 2) {
    switch (t.param_dtype) {
      case kF16:
        process_chunk<kMode, S, G, __half>(t, begin, end);
        break;
      case kBF16:
        process_chunk<kMode, S, G, __nv_bfloat16>(t, begin, end);
        break;
      default:
        process_chunk<kMode, S, G, float>(t, begin, end);
    }
  } else {
    process_chunk<kMode, S, G, float>(t, begin, end);  // P unused
  }
}

template <int kMode, typename S>
__device__ __forceinline__ void dispatch_grad(const SensTensor& t, int64_t begin, int64_t end) {
  switch (t.grad_dtype) {
    case kF16:
      dispatch_param<kMode, S, __half>(t, begin, end);
      break;
    case kBF16:
      dispatch_param<kMode, S, __nv_bfloat16>(t, begin, end);
      break;
    default:
      dispatch_param<kMode, S, float>(t, begin, end);
  }
}

template <int kMode>
__global__ void __launch_bounds__(kThreads) sensitivity_kernel(const SensTensor* __restrict__ tensors,
                                                               int num_tensors, int64_t total_chunks) {
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int ti = detail::find_tensor(tensors, num_tensors, c);
    const SensTensor t = tensors[ti];
    const int64_t begin = (c - t.chunk_begin) * kSensChunk;
    const int64_t end = begin + kSensChunk < t.numel ? begin + kSensChunk : t.numel;
    if (t.score_dtype == kBF16) {
      dispatch_grad<kMode, __nv_bfloat16>(t, begin, end);
    } else {
      dispatch_grad<kMode, float>(t, begin, end);
    }
  }
}

}  // namespace

cudaError_t sensitivity_accumulate_launch(const SensTensor* d_tensors, int num_tensors, int64_t total_chunks, int mode,
                                          cudaStream_t stream) {
  if (num_tensors <= 0 || total_chunks <= 0) return cudaSuccess;
  if (mode < 0 || mode > 3) return cudaErrorInvalidValue;
  // A persistent grid: enough resident blocks to saturate HBM (8 x 256 threads per SM), never more than chunks.
  const int64_t resident = static_cast<int64_t>(detail::num_sms()) * 8;
  const unsigned grid = static_cast<unsigned>(total_chunks < resident ? total_chunks : resident);
  switch (mode) {
    case 0:
      PPT_LAUNCH(sensitivity_kernel<0>, grid, kThreads, stream, d_tensors, num_tensors, total_chunks);
      break;
    case 1:
      PPT_LAUNCH(sensitivity_kernel<1>, grid, kThreads, stream, d_tensors, num_tensors, total_chunks);
      break;
    case 2:
      PPT_LAUNCH(sensitivity_kernel<2>, grid, kThreads, stream, d_tensors, num_tensors, total_chunks);
      break;
    default:
      PPT_LAUNCH(sensitivity_kernel<3>, grid, kThreads, stream, d_tensors, num_tensors, total_chunks);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ppt_fast
