// Device helpers shared by the kernel files (included only by .cu files; torch-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

// Every launch goes through this macro so that the same sources can also be compiled as host code by the logic
// emulation in tests/cuda_emulation/ (run by tests/test_cuda_kernels.py; PPT_FAST_HOST_EMULATION: blocks run one after
// another, their threads as OS threads; it checks the kernels' logic without a GPU, not their speed).
#ifdef PPT_FAST_HOST_EMULATION
#define PPT_LAUNCH(kernel, grid, block, stream, ...) ::ppt_fast_emu::launch((grid), (block), (kernel), __VA_ARGS__)
#else
#define PPT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace ppt_fast {
namespace cuda {
namespace detail {

// ------------------------------------------------------------------------------------------------ scalar loads
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  // round-to-nearest-even, the rounding torch's .to(float16) uses
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Runtime-typed scalar load/store (for scattered accesses where one sector is touched per element anyway, so a
// uniform switch costs nothing next to the memory latency).
__device__ __forceinline__ float load_as_float(const void* base, int64_t i, int32_t dtype) {
  switch (dtype) {
    case kF16:
      return __half2float(static_cast<const __half*>(base)[i]);
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* base, int64_t i, int32_t dtype, float x) {
  switch (dtype) {
    case kF16:
      static_cast<__half*>(base)[i] = __float2half_rn(x);
      break;
    case kBF16:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x);
      break;
    default:
      static_cast<float*>(base)[i] = x;
  }
}

// ------------------------------------------------------------------------------------ 8-element vector access
// Eight consecutive elements: one 16-byte load for 16-bit types, two for fp32. `p` must be 16-byte aligned.
// Streaming (.cs, evict-first) for data read exactly once (gradients), so it does not push scores out of L2.
template <typename T, bool kStreaming>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]);

template <>
__device__ __forceinline__ void load8<float, true>(const float* p, float (&out)[8]) {
  const float4 a = __ldcs(reinterpret_cast<const float4*>(p));
  const float4 b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<float, false>(const float* p, float (&out)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

template <typename T16>
__device__ __forceinline__ void unpack8(const uint4 raw, float (&out)[8]) {
  const T16* h = reinterpret_cast<const T16*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = Elem<T16>::to_float(h[i]);
}

template <>
__device__ __forceinline__ void load8<__half, true>(const __half* p, float (&out)[8]) {
  unpack8<__half>(__ldcs(reinterpret_cast<const uint4*>(p)), out);
}
template <>
__device__ __forceinline__ void load8<__half, false>(const __half* p, float (&out)[8]) {
  unpack8<__half>(*reinterpret_cast<const uint4*>(p), out);
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16, true>(const __nv_bfloat16* p, float (&out)[8]) {
  unpack8<__nv_bfloat16>(__ldcs(reinterpret_cast<const uint4*>(p)), out);
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16, false>(const __nv_bfloat16* p, float (&out)[8]) {
  unpack8<__nv_bfloat16>(*reinterpret_cast<const uint4*>(p), out);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]);

template <>
__device__ __forceinline__ void store8<float>(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <>
__device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* p, const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = __float2bfloat16_rn(v[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// ------------------------------------------------------------------------------------------------ chunk lookup
// The tensor owning global chunk `c`: the last t with table[t].chunk_begin <= c. Tables are a few hundred entries
// and every block reads the same ones, so the ~10 probes hit L1.
template <typename Desc>
__device__ __forceinline__ int find_tensor(const Desc* table, int num_tensors, int64_t c) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid].chunk_begin <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

inline int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // leave no sticky error behind; fall back to an H100-sized guess
    return 132;
  }
  return sms;
}

}  // namespace detail
}  // namespace cuda
}  // namespace ppt_fast
