// scores[i] += f(grads[i], params[i]) over many tensors in one parallel region.
//
// Layout: every tensor is flat and contiguous, so the work is a list of fixed-size chunks taken across all
// tensors (small tensors never leave a thread idle, big ones are split). Each chunk is one streaming loop
// over 2-3 arrays; the loop body is branch-free so GCC vectorizes it, and the op is then memory bound.
// Numerics: the update is computed in fp32 and the new score rounded once into the score dtype, exactly as the
// reference does, so fp32 and bf16 scores match it bit for bit.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "float_bits.h"
#include "ops.h"

namespace ppt_fast {
namespace {

enum Mode : int64_t { kGradSq = 0, kGradAbs = 1, kTaylor = 2, kSgdDelta = 3 };

// 64 Ki elements: large enough that the per-chunk overhead vanishes, small enough that the last wave of chunks
// is short and that a chunk's arrays (<= 768 KiB) stay within L2 while it runs.
constexpr int64_t kChunk = int64_t(1) << 16;

using ChunkFn = void (*)(void*, const void*, const void*, int64_t);

template <typename S, typename G, typename P, int64_t MODE>
__attribute__((always_inline)) inline void accumulate_body(S* __restrict__ s, const G* __restrict__ g,
                                                           const P* __restrict__ p, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float gj = load_f32(g[j]);
    float upd;
    if constexpr (MODE == kGradSq) {
      upd = gj * gj;
    } else if constexpr (MODE == kGradAbs) {
      upd = std::fabs(gj);
    } else if constexpr (MODE == kTaylor) {
      upd = std::fabs(gj * load_f32(p[j]));
    } else {
      upd = gj;
    }
    s[j] = store_from_f32<S>(load_f32(s[j]) + upd);
  }
}

template <typename S, typename G, typename P, int64_t MODE>
void accumulate_chunk(void* s, const void* g, const void* p, int64_t n) {
  accumulate_body<S, G, P, MODE>(static_cast<S*>(s), static_cast<const G*>(g), static_cast<const P*>(p), n);
}

#if defined(__GNUC__) && defined(__x86_64__)
// The same loop compiled for AVX2 (8 fp32 lanes instead of SSE2's 4), picked at run time: the build targets
// baseline x86-64, and the fp16/bf16 widening and rounding are integer work that gains from the wider lanes.
// No FMA is enabled, so both versions round identically.
#define PPT_FAST_HAVE_AVX2_CLONE 1
template <typename S, typename G, typename P, int64_t MODE>
__attribute__((target("avx2"))) void accumulate_chunk_avx2(void* s, const void* g, const void* p, int64_t n) {
  accumulate_body<S, G, P, MODE>(static_cast<S*>(s), static_cast<const G*>(g), static_cast<const P*>(p), n);
}
#endif

template <typename S, typename G, typename P, int64_t MODE>
ChunkFn pick_isa() {
#ifdef PPT_FAST_HAVE_AVX2_CLONE
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    return &accumulate_chunk_avx2<S, G, P, MODE>;
  }
#endif
  return &accumulate_chunk<S, G, P, MODE>;
}

template <typename S, typename G, typename P>
ChunkFn pick_mode(int64_t mode) {
  switch (mode) {
    case kGradSq:
      return pick_isa<S, G, P, kGradSq>();
    case kGradAbs:
      return pick_isa<S, G, P, kGradAbs>();
    case kTaylor:
      return pick_isa<S, G, P, kTaylor>();
    default:
      return pick_isa<S, G, P, kSgdDelta>();
  }
}

template <typename S, typename G>
ChunkFn pick_param(int64_t mode, c10::ScalarType param_dtype) {
  if (mode != kTaylor) {
    return pick_mode<S, G, float>(mode);  // params unused: one instantiation
  }
  switch (param_dtype) {
    case at::kFloat:
      return pick_mode<S, G, float>(mode);
    case at::kHalf:
      return pick_mode<S, G, c10::Half>(mode);
    case at::kBFloat16:
      return pick_mode<S, G, c10::BFloat16>(mode);
    default:
      TORCH_CHECK(false, "ppt_fast: params must be float32, float16 or bfloat16, got ", param_dtype);
  }
}

template <typename S>
ChunkFn pick_grad(int64_t mode, c10::ScalarType grad_dtype, c10::ScalarType param_dtype) {
  switch (grad_dtype) {
    case at::kFloat:
      return pick_param<S, float>(mode, param_dtype);
    case at::kHalf:
      return pick_param<S, c10::Half>(mode, param_dtype);
    case at::kBFloat16:
      return pick_param<S, c10::BFloat16>(mode, param_dtype);
    default:
      TORCH_CHECK(false, "ppt_fast: grads must be float32, float16 or bfloat16, got ", grad_dtype);
  }
}

ChunkFn pick(int64_t mode, c10::ScalarType score_dtype, c10::ScalarType grad_dtype, c10::ScalarType param_dtype) {
  switch (score_dtype) {
    case at::kFloat:
      return pick_grad<float>(mode, grad_dtype, param_dtype);
    case at::kBFloat16:
      return pick_grad<c10::BFloat16>(mode, grad_dtype, param_dtype);
    default:
      TORCH_CHECK(false, "ppt_fast: scores must be float32 or bfloat16, got ", score_dtype);
  }
}

struct Chunk {
  ChunkFn fn;
  char* s;
  const char* g;
  const char* p;
  int64_t n;
};

}  // namespace

void sensitivity_accumulate_cpp(at::TensorList scores, at::TensorList grads, at::TensorList params, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "ppt_fast: mode must be 0 (grad_sq), 1 (grad_abs), 2 (taylor) or 3 (sgd_delta)");
  TORCH_CHECK(grads.size() == scores.size(), "ppt_fast: scores has ", scores.size(), " tensors but grads has ",
              grads.size());
  const bool taylor = mode == kTaylor;
  TORCH_CHECK(!taylor || params.size() == scores.size(), "ppt_fast: mode taylor needs one param per score (got ",
              params.size(), " params for ", scores.size(), " scores)");

  // Read-only inputs may arrive as strided views: copy those once. Kept alive here until the region ends.
  std::vector<at::Tensor> g_keep, p_keep;
  g_keep.reserve(grads.size());
  p_keep.reserve(params.size());
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor& s = scores[i];
    TORCH_CHECK(s.device().is_cpu() && grads[i].device().is_cpu(), "ppt_fast: scores[", i, "] / grads[", i,
                "] must be CPU tensors for the cpp backend");
    TORCH_CHECK(s.is_contiguous(), "ppt_fast: scores[", i, "] must be contiguous (it is updated in place)");
    TORCH_CHECK(grads[i].sizes() == s.sizes(), "ppt_fast: grads[", i, "] has shape ", grads[i].sizes(),
                " but scores[", i, "] has ", s.sizes());
    g_keep.push_back(grads[i].contiguous());
    c10::ScalarType p_dtype = at::kFloat;
    const char* p_base = nullptr;
    if (taylor) {
      TORCH_CHECK(params[i].sizes() == s.sizes(), "ppt_fast: params[", i, "] has shape ", params[i].sizes(),
                  " but scores[", i, "] has ", s.sizes());
      TORCH_CHECK(params[i].device().is_cpu(), "ppt_fast: params[", i, "] must be a CPU tensor");
      p_keep.push_back(params[i].contiguous());
      p_dtype = p_keep.back().scalar_type();
      p_base = static_cast<const char*>(p_keep.back().data_ptr());
    }
    const ChunkFn fn = pick(mode, s.scalar_type(), g_keep.back().scalar_type(), p_dtype);
    const int64_t n = s.numel();
    if (n == 0) {
      continue;
    }
    char* s_base = static_cast<char*>(s.data_ptr());
    const char* g_base = static_cast<const char*>(g_keep.back().data_ptr());
    const int64_t s_size = s.element_size(), g_size = g_keep.back().element_size();
    const int64_t p_size = taylor ? p_keep.back().element_size() : 0;
    for (int64_t start = 0; start < n; start += kChunk) {
      chunks.push_back({fn, s_base + start * s_size, g_base + start * g_size,
                        p_base ? p_base + start * p_size : nullptr, std::min(kChunk, n - start)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      ch.fn(ch.s, ch.g, ch.p, ch.n);
    }
  });
}

}  // namespace ppt_fast
