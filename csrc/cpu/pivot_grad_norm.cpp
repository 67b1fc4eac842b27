// The norm of the gradients at the pivots of many tensors, in one parallel pass (what clipping over the pivots needs).
//
// Each chunk of pivots (never spanning two tensors) gathers its gradients and reduces them in double, so fp32
// squares cannot overflow and the result does not depend on the thread count: partials are combined in chunk
// order. A NaN anywhere makes the norm NaN and an inf (with no NaN) makes it inf, for every norm type, as
// torch.linalg.vector_norm does; so "norm is finite" is exactly "every pivot gradient is finite".

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <vector>

#include "float_bits.h"
#include "ops.h"

namespace ppt_fast {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int64_t kPrefetch = 24;  // as in sparse_adamw_step.cpp: scattered gathers need misses in flight

struct Partial {
  double acc = 0.0;  // sum of |g|^p, or max |g| for the inf norm
  bool nan = false;
  bool inf = false;
  bool outside = false;
};

enum class Kind { kL2, kL1, kInf, kP };

template <typename G, bool DENSE>
Partial reduce_chunk(const G* __restrict__ grad, const int32_t* __restrict__ idx, int64_t n, int64_t numel, Kind kind,
                     double p) {
  Partial r;
  const uint32_t size = static_cast<uint32_t>(numel);
  for (int64_t j = 0; j < n; ++j) {
    float g;
    if constexpr (DENSE) {
      if (j + kPrefetch < n && static_cast<uint32_t>(idx[j + kPrefetch]) < size) {
        __builtin_prefetch(grad + idx[j + kPrefetch], 0, 0);
      }
      if (static_cast<uint32_t>(idx[j]) >= size) {
        r.outside = true;
        continue;
      }
      g = load_f32(grad[idx[j]]);
    } else {
      g = load_f32(grad[j]);
    }
    const double a = std::fabs(static_cast<double>(g));
    if (a != a) {
      r.nan = true;
      continue;
    }
    if (a == std::numeric_limits<double>::infinity()) {
      r.inf = true;
      continue;
    }
    switch (kind) {
      case Kind::kL2:
        r.acc += a * a;
        break;
      case Kind::kL1:
        r.acc += a;
        break;
      case Kind::kInf:
        r.acc = a > r.acc ? a : r.acc;
        break;
      case Kind::kP:
        r.acc += std::pow(a, p);
        break;
    }
  }
  return r;
}

using ReduceFn = Partial (*)(const void*, const int32_t*, int64_t, int64_t, Kind, double);

template <typename G, bool DENSE>
Partial reduce_erased(const void* grad, const int32_t* idx, int64_t n, int64_t numel, Kind kind, double p) {
  return reduce_chunk<G, DENSE>(static_cast<const G*>(grad), idx, n, numel, kind, p);
}

ReduceFn pick(c10::ScalarType dtype, bool dense) {
  switch (dtype) {
    case at::kFloat:
      return dense ? &reduce_erased<float, true> : &reduce_erased<float, false>;
    case at::kHalf:
      return dense ? &reduce_erased<c10::Half, true> : &reduce_erased<c10::Half, false>;
    case at::kBFloat16:
      return dense ? &reduce_erased<c10::BFloat16, true> : &reduce_erased<c10::BFloat16, false>;
    default:
      TORCH_CHECK(false, "ppt_fast: gradients must be float32, float16 or bfloat16, got ", dtype);
  }
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

}  // namespace

at::Tensor pivot_grad_norm_cpp(at::TensorList grads, at::IntArrayRef offsets, const at::Tensor& indices,
                               const std::optional<at::Tensor>& pivot_grads, double norm_type) {
  const bool dense = !pivot_grads.has_value();
  const int64_t n_tensors = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(n_tensors >= 0 && offsets[0] == 0, "ppt_fast: offsets must start at 0");
  TORCH_CHECK(!dense || static_cast<int64_t>(grads.size()) == n_tensors, "ppt_fast: ", grads.size(),
              " grads for ", n_tensors, " tensors");
  const int64_t k = offsets[n_tensors];
  TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == at::kInt && indices.dim() == 1 &&
                  indices.numel() == k && indices.is_contiguous(),
              "ppt_fast: indices must be a contiguous int32 CPU tensor of shape [", k, "]");
  TORCH_CHECK(norm_type > 0.0, "ppt_fast: norm_type must be > 0 (or inf), got ", norm_type);
  Kind kind = Kind::kP;
  if (norm_type == 2.0) kind = Kind::kL2;
  if (norm_type == 1.0) kind = Kind::kL1;
  if (std::isinf(norm_type)) kind = Kind::kInf;

  at::Tensor pg;
  if (!dense) {
    pg = pivot_grads->contiguous();
    TORCH_CHECK(pg.device().is_cpu() && pg.dim() == 1 && pg.numel() == k, "ppt_fast: pivot_grads must be a CPU [", k,
                "] tensor");
  }
  std::vector<at::Tensor> keep;
  std::vector<ReduceFn> fns(std::max<int64_t>(n_tensors, 0));
  std::vector<int64_t> numels(fns.size(), 0);
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t lo = offsets[i], hi = offsets[i + 1];
    TORCH_CHECK(lo <= hi && hi <= k, "ppt_fast: offsets must never decrease and end at len(indices)");
    if (dense) {
      TORCH_CHECK(grads[i].device().is_cpu(), "ppt_fast: grads[", i, "] must be a CPU tensor");
      keep.push_back(grads[i].contiguous());
      numels[i] = keep.back().numel();
      fns[i] = pick(keep.back().scalar_type(), true);
    } else {
      fns[i] = pick(pg.scalar_type(), false);
    }
    for (int64_t b = lo; b < hi; b += kChunk) {
      chunks.push_back({i, b, std::min(b + kChunk, hi)});
    }
  }
  const int32_t* idx = indices.const_data_ptr<int32_t>();
  const char* pg_base = dense ? nullptr : static_cast<const char*>(pg.const_data_ptr());
  const int64_t pg_size = dense ? 0 : pg.element_size();
  std::vector<Partial> parts(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      const Chunk& ch = chunks[ci];
      const void* grad = dense ? keep[ch.tensor].const_data_ptr() : pg_base + ch.begin * pg_size;
      parts[ci] = fns[ch.tensor](grad, idx + ch.begin, ch.end - ch.begin, numels[ch.tensor], kind, norm_type);
    }
  });
  double acc = 0.0;
  bool nan = false, inf = false;
  for (size_t ci = 0; ci < parts.size(); ++ci) {
    TORCH_CHECK(!parts[ci].outside, "ppt_fast: indices of tensor ", chunks[ci].tensor,
                " reach outside its gradient: the PivotSet was built for other tensors");
    nan |= parts[ci].nan;
    inf |= parts[ci].inf;
    acc = kind == Kind::kInf ? std::max(acc, parts[ci].acc) : acc + parts[ci].acc;
  }
  double norm;
  if (nan) {
    norm = std::numeric_limits<double>::quiet_NaN();
  } else if (inf) {
    norm = std::numeric_limits<double>::infinity();
  } else if (kind == Kind::kL2) {
    norm = std::sqrt(acc);
  } else if (kind == Kind::kL1 || kind == Kind::kInf) {
    norm = acc;
  } else {
    norm = std::pow(acc, 1.0 / norm_type);
  }
  return at::scalar_tensor(norm, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace ppt_fast
