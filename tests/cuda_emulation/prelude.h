// Host emulation of the CUDA device features ppt_fast's kernels use (csrc/cuda/common.cuh, PPT_FAST_HOST_EMULATION).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace ppt_fast_emu {
struct Dim { unsigned x = 0, y = 1, z = 1; };
inline thread_local Dim tidx, bidx;
inline Dim bdim, gdim;
inline std::barrier<>* block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline uint64_t xchg[1024];

template <class K, class... A>
void launch(unsigned grid, unsigned block, K kernel, A... args) {
  gdim.x = grid;
  bdim.x = block;
  std::barrier<> bb(block);
  block_bar = &bb;
  warp_bars.clear();
  for (unsigned w = 0; w < (block + 31) / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([=] { tidx.x = t; bidx.x = b; kernel(args...); });
    for (auto& th : threads) th.join();
  }
}
inline void syncthreads() { block_bar->arrive_and_wait(); }
inline void syncwarp() { warp_bars[tidx.x >> 5]->arrive_and_wait(); }
template <class T>
T shfl(T v, int src_offset) {
  static_assert(sizeof(T) <= 8);
  const int lane = tidx.x & 31;
  std::memcpy(&xchg[tidx.x], &v, sizeof(T));
  syncwarp();
  T r = v;
  const int src = lane + src_offset;
  if (src >= 0 && src < 32) std::memcpy(&r, &xchg[tidx.x + src_offset], sizeof(T));
  syncwarp();
  return r;
}
inline unsigned atomic_add(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomic_add(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline uint32_t float_as_uint(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
template <class T> T ldcs(const T* p) { return *p; }
}  // namespace ppt_fast_emu

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#define threadIdx ::ppt_fast_emu::tidx
#define blockIdx ::ppt_fast_emu::bidx
#define blockDim ::ppt_fast_emu::bdim
#define gridDim ::ppt_fast_emu::gdim
#define __syncthreads() ::ppt_fast_emu::syncthreads()
#define __syncwarp() ::ppt_fast_emu::syncwarp()
#define __shfl_up_sync(mask, v, d) ::ppt_fast_emu::shfl((v), -static_cast<int>(d))
#define __shfl_down_sync(mask, v, d) ::ppt_fast_emu::shfl((v), static_cast<int>(d))
#define atomicAdd ::ppt_fast_emu::atomic_add
#define __float_as_uint ::ppt_fast_emu::float_as_uint
#define __ldcs ::ppt_fast_emu::ldcs
#define __fmul_rn(a, b) ((a) * (b))
#define __fadd_rn(a, b) ((a) + (b))
#define __fsub_rn(a, b) ((a) - (b))
#define __fdiv_rn(a, b) ((a) / (b))
#define __fmaf_rn(a, b, c) std::fma((a), (b), (c))
#define __fsqrt_rn(a) std::sqrt(a)
