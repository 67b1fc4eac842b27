// Branch-free fp32 <-> fp16/bf16 conversions used by the CPU kernels' inner loops.
//
// They are written as plain integer arithmetic on bit patterns (no table, no branch) so that GCC's
// auto-vectorizer turns the streaming loops into SIMD code; c10's own scalar conversions carry a NaN
// branch that blocks it. The results are bit-identical to c10 (round-to-nearest-even, NaN -> 0x7FC0
// for bf16), so the C++ backend rounds exactly like the PyTorch reference.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace ppt_fast {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float load_f32(float x) {
  return x;
}

inline float load_f32(c10::BFloat16 x) {
  return bits_f32(static_cast<uint32_t>(x.x) << 16);
}

inline float load_f32(c10::Half x) {
  // Exact fp16 -> fp32 with selects instead of c10's branches (so loops over fp16 vectorize): rebias the exponent;
  // inf/NaN keep their payload; subnormals are renormalised by an exact fp32 subtraction of normal numbers, which
  // stays right even when the FPU flushes denormals (torch.set_flush_denormal).
  const uint32_t h = x.x;
  const uint32_t em = h & 0x7FFFu;
  const uint32_t exp = em & 0x7C00u;
  uint32_t o = (em << 13) + ((127u - 15u) << 23);
  o = exp == 0x7C00u ? o + ((128u - 16u) << 23) : o;
  const float sub = bits_f32(o + (1u << 23)) - bits_f32(113u << 23);
  o = exp == 0 ? f32_bits(sub) : o;
  return bits_f32(o | ((h & 0x8000u) << 16));
}

template <typename T>
inline T store_from_f32(float f);

template <>
inline float store_from_f32<float>(float f) {
  return f;
}

template <>
inline c10::BFloat16 store_from_f32<c10::BFloat16>(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <>
inline c10::Half store_from_f32<c10::Half>(float f) {
  return c10::Half(f);
}

// Magnitude key of an entry: the fp32 bit pattern of |x|. As an unsigned integer it orders like |x|, and
// anything above 0x7F800000 (+inf) is a NaN. fp16/bf16 are widened first, exactly, so mixed dtypes share keys.
constexpr uint32_t kNaNKey = 0x7F800000u;

template <typename T>
inline uint32_t magnitude_key(T x) {
  return f32_bits(load_f32(x)) & 0x7FFFFFFFu;
}

template <>
inline uint32_t magnitude_key<c10::BFloat16>(c10::BFloat16 x) {
  return (static_cast<uint32_t>(x.x) << 16) & 0x7FFFFFFFu;
}

}  // namespace ppt_fast
