// One AdamW step over the pivots of many tensors, in one parallel region, with state only for the pivots.
//
// Work is a list of pivot chunks taken across all tensors (a chunk never spans two tensors). Pivots are sorted
// within a tensor, so the gathers from the dense gradient and parameter walk memory forwards and the hardware
// prefetcher keeps up. Each chunk runs in small blocks: gather g (and θ when there is no master) into a local
// buffer, do the AdamW math on contiguous fp32 arrays (this part vectorizes: sqrt and div dominate it), then
// scatter θ back. Numerics follow torch.optim.AdamW's order of operations in fp32, with the scalar
// coefficients computed in double and rounded once to fp32, as the PyTorch reference does.
//
// With a `nonfinite` flag the step is checked: a NaN/inf gradient anywhere must leave every m, v and θ untouched.
// Two ways, chosen by density (kCheckFirstDensityInverse):
// - speculative (sparse pivots): checking first would walk the scattered gradients and the scattered θ in two
//   separate passes, and one pass with both gathers in flight is ~1.3x faster than the two at 1 % density. So the
//   single pass runs speculatively: each block first copies its old m, v and θ (contiguous, in registers already)
//   into a backup and notes any non-finite gradient; in the rare step that had one, a second pass puts the backup
//   back, bit for bit, before the call returns. Cost: 12 B per pivot of sequential writes to fresh memory.
// - check first (dense pivots, or gradients already gathered): gather and check into a 4 B/pivot scratch, then the
//   update reads it. Neighbouring pivots share cache lines, so little overlap is lost, and the fresh memory is a
//   third of the backup's.

// An index outside its tensor is never dereferenced: the pass skips that pivot (the Python op refuses such indices
// before calling here; this is defence in depth, and costs one compare).

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "float_bits.h"
#include "ops.h"

namespace ppt_fast {
namespace {

constexpr int64_t kChunk = 16384;  // pivots per task: enough to amortise scheduling, small enough to balance
constexpr int64_t kBlock = 256;  // pivots per inner block: the local buffers stay in L1
constexpr int64_t kPrefetch = 24;
// A checked step checks first when k >= N / this (pivots denser than ~2.5 %), else runs speculatively (measured on
// musicgen-small's layers, 2 cores: check-first 1.22x the unchecked pass at 1 %, 1.12x at 5 %; speculative 1.02-1.07x
// at 1 %, 1.25-1.5x at 5 %, where its fresh 12 B/pivot backup costs page faults and write traffic).
constexpr int64_t kCheckFirstDensityInverse = 40;


struct Coeffs {
  float decay;  // 1 - lr * wd
  float lerp_weight;  // 1 - beta1
  bool lerp_small;  // torch's lerp switches formula at weight 0.5 to stay exact at both ends
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  bool has_scale;
  float grad_scale;
  bool has_coef;
  float grad_coef;  // the clipping coefficient, applied after the unscale
};

struct Chunk {
  int64_t tensor;
  int64_t begin;  // pivot range [begin, end) in the packed arrays
  int64_t end;
};

// Where a checked step keeps the old values of its pivots (each [k], indexed like m and v), or all null.
struct Backup {
  float* m;
  float* v;
  float* theta;  // the old master value, or the old fp32 parameter value when there is no master
};

// DENSE: the gradient is gathered from grads[i] at the pivot's index; otherwise read from pivot_grads[j]. `bk`
// (offset to this chunk) non-null: keep the old values first. Returns 1 when a gradient was inf/NaN, else 0.
template <typename P, typename G, bool DENSE, bool MASTER>
uint32_t step_chunk(P* __restrict__ param, const G* __restrict__ grad, const int32_t* __restrict__ idx,
                    float* __restrict__ m, float* __restrict__ v, float* __restrict__ master, int64_t n,
                    int64_t numel, const Coeffs& c, Backup bk) {
  float g[kBlock];
  float theta[kBlock];
  bool in[kBlock];
  const uint32_t size = static_cast<uint32_t>(numel);
  // inf/NaN is an all-ones exponent: an integer OR per pivot keeps the loop-carried chain at one cycle.
  uint32_t bad = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - b0);
    const int32_t* ib = idx + b0;
    // At 1 % density consecutive pivots sit ~400 bytes apart: every gather is a cache miss the stream prefetcher
    // does not predict. Software prefetches kPrefetch pivots ahead keep that many misses in flight.
    const int64_t ahead = std::min(kPrefetch, n - b0 - nb);
    for (int64_t j = 0; j < nb; ++j) {
      if (j + kPrefetch < nb + ahead) {
        const int32_t far = ib[j + kPrefetch];
        if (static_cast<uint32_t>(far) < size) {
          if constexpr (DENSE) {
            __builtin_prefetch(grad + far, 0, 0);
          }
          __builtin_prefetch(param + far, 1, 0);
        }
      }
      // Negative indices wrap to huge unsigned values, so one compare bounds both ends.
      in[j] = static_cast<uint32_t>(ib[j]) < size;
      if constexpr (DENSE) {
        g[j] = in[j] ? load_f32(grad[ib[j]]) : 0.0f;
      } else {
        g[j] = load_f32(grad[b0 + j]);
      }
      if constexpr (!MASTER) {
        theta[j] = in[j] ? load_f32(param[ib[j]]) : 0.0f;
      }
    }
    if constexpr (MASTER) {
      for (int64_t j = 0; j < nb; ++j) {
        theta[j] = master[b0 + j];
      }
    }
    float* mb = m + b0;
    float* vb = v + b0;
    if (bk.m != nullptr) {
      std::copy(mb, mb + nb, bk.m + b0);
      std::copy(vb, vb + nb, bk.v + b0);
      std::copy(theta, theta + nb, bk.theta + b0);
    }
    for (int64_t j = 0; j < nb; ++j) {
      float gj = g[j];
      if (c.has_scale) {
        gj = gj / c.grad_scale;  // a true division, as GradScaler's unscale in the reference
      }
      if (c.has_coef) {
        gj = gj * c.grad_coef;
      }
      bad |= static_cast<uint32_t>((f32_bits(gj) & 0x7F800000u) == 0x7F800000u);
      float t = theta[j] * c.decay;
      const float mj = c.lerp_small ? mb[j] + c.lerp_weight * (gj - mb[j])
                                    : gj - (gj - mb[j]) * (1.0f - c.lerp_weight);
      const float vj = vb[j] * c.beta2 + c.one_minus_beta2 * gj * gj;
      const float denom = std::sqrt(vj) / c.bias_correction2_sqrt + c.eps;
      t = t + c.neg_step_size * (mj / denom);
      mb[j] = mj;
      vb[j] = vj;
      theta[j] = t;
    }
    if constexpr (MASTER) {
      for (int64_t j = 0; j < nb; ++j) {
        master[b0 + j] = theta[j];
      }
    }
    for (int64_t j = 0; j < nb; ++j) {
      if (in[j]) {
        param[ib[j]] = store_from_f32<P>(theta[j]);
      }
    }
  }
  return bad;
}

// Undo a checked step that met a non-finite gradient: m, v, the master and θ at the pivots, from the backup. θ goes
// back as the old fp32 value (no master) or as the old master rounded once, which is what the parameter held: the
// optimizer keeps parameter == master rounded at every pivot.
template <typename P>
void restore_chunk(P* __restrict__ param, const int32_t* __restrict__ idx, float* __restrict__ m,
                   float* __restrict__ v, float* __restrict__ master, int64_t n, int64_t numel, Backup bk) {
  const uint32_t size = static_cast<uint32_t>(numel);
  std::copy(bk.m, bk.m + n, m);
  std::copy(bk.v, bk.v + n, v);
  if (master != nullptr) {
    std::copy(bk.theta, bk.theta + n, master);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (static_cast<uint32_t>(idx[j]) < size) {
      param[idx[j]] = store_from_f32<P>(bk.theta[j]);
    }
  }
}

using ChunkFn = uint32_t (*)(void*, const void*, const int32_t*, float*, float*, float*, int64_t, int64_t,
                             const Coeffs&, Backup);

template <typename P, typename G, bool DENSE, bool MASTER>
uint32_t step_chunk_erased(void* param, const void* grad, const int32_t* idx, float* m, float* v, float* master,
                           int64_t n, int64_t numel, const Coeffs& c, Backup bk) {
  return step_chunk<P, G, DENSE, MASTER>(static_cast<P*>(param), static_cast<const G*>(grad), idx, m, v, master, n,
                                         numel, c, bk);
}

// Phase 1 of a check-first step: out[j] = grad at pivot j, unscaled and clipped, in fp32. Returns 1 when a value is
// inf/NaN, else 0.
template <typename G, bool DENSE>
int gather_chunk(const G* __restrict__ grad, const int32_t* __restrict__ idx, float* __restrict__ out, int64_t n,
                 int64_t numel, const Coeffs& c) {
  const uint32_t size = static_cast<uint32_t>(numel);
  // inf/NaN is an all-ones exponent: an integer OR per pivot keeps the loop-carried chain at one cycle (a float
  // accumulator would serialise every pivot on the adder's latency).
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    float g;
    if constexpr (DENSE) {
      if (j + kPrefetch < n && static_cast<uint32_t>(idx[j + kPrefetch]) < size) {
        __builtin_prefetch(grad + idx[j + kPrefetch], 0, 0);
      }
      // an index outside the tensor reads nothing (and the update skips it)
      g = static_cast<uint32_t>(idx[j]) < size ? load_f32(grad[idx[j]]) : 0.0f;
    } else {
      g = load_f32(grad[j]);
    }
    if (c.has_scale) {
      g = g / c.grad_scale;
    }
    if (c.has_coef) {
      g = g * c.grad_coef;
    }
    out[j] = g;
    bad |= static_cast<uint32_t>((f32_bits(g) & 0x7F800000u) == 0x7F800000u);
  }
  return bad ? 1 : 0;
}

using GatherFn = int (*)(const void*, const int32_t*, float*, int64_t, int64_t, const Coeffs&);

template <typename G, bool DENSE>
int gather_chunk_erased(const void* grad, const int32_t* idx, float* out, int64_t n, int64_t numel,
                        const Coeffs& c) {
  return gather_chunk<G, DENSE>(static_cast<const G*>(grad), idx, out, n, numel, c);
}

GatherFn pick_gather(c10::ScalarType grad_dtype, bool dense) {
  switch (grad_dtype) {
    case at::kFloat:
      return dense ? &gather_chunk_erased<float, true> : &gather_chunk_erased<float, false>;
    case at::kHalf:
      return dense ? &gather_chunk_erased<c10::Half, true> : &gather_chunk_erased<c10::Half, false>;
    case at::kBFloat16:
      return dense ? &gather_chunk_erased<c10::BFloat16, true> : &gather_chunk_erased<c10::BFloat16, false>;
    default:
      TORCH_CHECK(false, "ppt_fast: gradients must be float32, float16 or bfloat16, got ", grad_dtype);
  }
}

using RestoreFn = void (*)(void*, const int32_t*, float*, float*, float*, int64_t, int64_t, Backup);

template <typename P>
void restore_chunk_erased(void* param, const int32_t* idx, float* m, float* v, float* master, int64_t n,
                          int64_t numel, Backup bk) {
  restore_chunk<P>(static_cast<P*>(param), idx, m, v, master, n, numel, bk);
}

RestoreFn pick_restore(c10::ScalarType param_dtype) {
  switch (param_dtype) {
    case at::kFloat:
      return &restore_chunk_erased<float>;
    case at::kHalf:
      return &restore_chunk_erased<c10::Half>;
    case at::kBFloat16:
      return &restore_chunk_erased<c10::BFloat16>;
    default:
      TORCH_CHECK(false, "ppt_fast: params must be float32, float16 or bfloat16, got ", param_dtype);
  }
}

template <typename P, typename G>
ChunkFn pick_flags(bool dense, bool master) {
  if (dense) {
    return master ? &step_chunk_erased<P, G, true, true> : &step_chunk_erased<P, G, true, false>;
  }
  return master ? &step_chunk_erased<P, G, false, true> : &step_chunk_erased<P, G, false, false>;
}

template <typename P>
ChunkFn pick_grad(c10::ScalarType grad_dtype, bool dense, bool master) {
  switch (grad_dtype) {
    case at::kFloat:
      return pick_flags<P, float>(dense, master);
    case at::kHalf:
      return pick_flags<P, c10::Half>(dense, master);
    case at::kBFloat16:
      return pick_flags<P, c10::BFloat16>(dense, master);
    default:
      TORCH_CHECK(false, "ppt_fast: gradients must be float32, float16 or bfloat16, got ", grad_dtype);
  }
}

ChunkFn pick(c10::ScalarType param_dtype, c10::ScalarType grad_dtype, bool dense, bool master) {
  switch (param_dtype) {
    case at::kFloat:
      return pick_grad<float>(grad_dtype, dense, master);
    case at::kHalf:
      return pick_grad<c10::Half>(grad_dtype, dense, master);
    case at::kBFloat16:
      return pick_grad<c10::BFloat16>(grad_dtype, dense, master);
    default:
      TORCH_CHECK(false, "ppt_fast: params must be float32, float16 or bfloat16, got ", param_dtype);
  }
}

void check_state(const at::Tensor& t, const char* name, int64_t k) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == k &&
                  t.is_contiguous(),
              "ppt_fast: ", name, " must be a contiguous float32 CPU tensor of shape [", k, "], got ",
              t.scalar_type(), " ", t.sizes());
}

float scalar_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device().is_cpu(), "ppt_fast: ", name,
              " must be a one-element float32 CPU tensor");
  return *t.const_data_ptr<float>();
}

// The caller's workspace when it is large enough (a fp32 CPU tensor reused every step: fresh memory costs a page
// fault per 4 KiB, ~40 % of a step at 4 M pivots), else a fresh allocation freed when the call returns.
at::Tensor scratch_of(const std::optional<at::Tensor>& workspace, int64_t n, const at::Tensor& like) {
  if (workspace.has_value() && workspace->device().is_cpu() && workspace->scalar_type() == at::kFloat &&
      workspace->is_contiguous() && workspace->numel() >= n) {
    return *workspace;
  }
  return at::empty({n}, like.options());
}

}  // namespace

void sparse_adamw_step_cpp(at::TensorList params, at::TensorList grads, at::IntArrayRef offsets,
                           const at::Tensor& indices, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                           const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& pivot_grads,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& grad_coef, const std::optional<at::Tensor>& nonfinite,
                           double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                           const std::optional<at::Tensor>& workspace) {
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == n_tensors + 1, "ppt_fast: offsets has ", offsets.size(),
              " entries; expected len(params) + 1 = ", n_tensors + 1);
  TORCH_CHECK(step >= 1, "ppt_fast: step must be >= 1 (1-based, for bias correction), got ", step);
  const bool dense = !pivot_grads.has_value();
  TORCH_CHECK(dense == (static_cast<int64_t>(grads.size()) == n_tensors) &&
                  (dense || grads.empty()),
              "ppt_fast: give either one dense grad per param or pivot_grads (got ", grads.size(), " grads for ",
              n_tensors, " params, pivot_grads ", pivot_grads.has_value() ? "given" : "absent", ")");
  const int64_t k = offsets[n_tensors];
  TORCH_CHECK(offsets[0] == 0, "ppt_fast: offsets must start at 0");
  TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == at::kInt && indices.dim() == 1 &&
                  indices.numel() == k && indices.is_contiguous(),
              "ppt_fast: indices must be a contiguous int32 CPU tensor of shape [offsets[-1]] = [", k, "]");
  check_state(exp_avg, "exp_avg", k);
  check_state(exp_avg_sq, "exp_avg_sq", k);
  if (master.has_value()) {
    check_state(*master, "master", k);
  }
  at::Tensor pg;
  if (!dense) {
    pg = pivot_grads->contiguous();
    TORCH_CHECK(pg.device().is_cpu() && pg.dim() == 1 && pg.numel() == k, "ppt_fast: pivot_grads must be a CPU tensor "
                "of shape [", k, "], got ", pg.sizes());
  }
  if (nonfinite.has_value()) {
    (void)scalar_value(*nonfinite, "nonfinite");
  }
  if (found_inf.has_value() && scalar_value(*found_inf, "found_inf") != 0.0f) {
    return;  // GradScaler found inf/NaN gradients: skip the whole step, write nothing
  }
  if (k == 0) {
    return;
  }

  Coeffs c;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.lerp_weight = static_cast<float>(1.0 - beta1);
  c.lerp_small = std::abs(c.lerp_weight) < 0.5f;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  c.eps = static_cast<float>(eps);
  c.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(beta1, static_cast<double>(step)))));
  c.has_scale = grad_scale.has_value();
  c.grad_scale = c.has_scale ? scalar_value(*grad_scale, "grad_scale") : 1.0f;
  c.has_coef = grad_coef.has_value();
  c.grad_coef = c.has_coef ? scalar_value(*grad_coef, "grad_coef") : 1.0f;

  std::vector<at::Tensor> g_keep;
  std::vector<int64_t> numels(n_tensors, 0);
  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<size_t>(k / kChunk + n_tensors));
  for (int64_t i = 0; i < n_tensors; ++i) {
    const at::Tensor& p = params[i];
    const int64_t lo = offsets[i], hi = offsets[i + 1];
    TORCH_CHECK(lo <= hi && hi <= k, "ppt_fast: offsets must never decrease and end at len(indices)");
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "ppt_fast: params[", i,
                "] must be a contiguous CPU tensor (updated in place)");
    TORCH_CHECK(hi - lo <= p.numel(), "ppt_fast: tensor ", i, " has ", hi - lo, " pivots but params[", i, "] only ",
                p.numel(), " entries");
    TORCH_CHECK(master.has_value() || p.scalar_type() == at::kFloat || lo == hi, "ppt_fast: params[", i, "] is ",
                p.scalar_type(), " and needs an fp32 master copy of its pivots (pass master=)");
    numels[i] = p.numel();
    if (dense) {
      TORCH_CHECK(grads[i].sizes() == p.sizes() && grads[i].device().is_cpu(), "ppt_fast: grads[", i,
                  "] must be a CPU tensor shaped like params[", i, "] ", p.sizes(), ", got ", grads[i].sizes());
      g_keep.push_back(grads[i].contiguous());
    }
    for (int64_t b = lo; b < hi; b += kChunk) {
      chunks.push_back({i, b, std::min(b + kChunk, hi)});
    }
  }

  const int32_t* idx = indices.const_data_ptr<int32_t>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  float* ms = master.has_value() ? master->data_ptr<float>() : nullptr;
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());

  std::vector<ChunkFn> fns(n_tensors, nullptr);
  for (int64_t i = 0; i < n_tensors; ++i) {
    fns[i] = pick(params[i].scalar_type(), dense ? g_keep[i].scalar_type() : pg.scalar_type(), dense,
                  master.has_value());
  }
  const bool checked = nonfinite.has_value();
  int64_t total = 0;
  for (int64_t i = 0; i < n_tensors; ++i) {
    total += numels[i];
  }
  const char* pg_base = dense ? nullptr : static_cast<const char*>(pg.const_data_ptr());
  const int64_t pg_size = dense ? 0 : pg.element_size();
  // Dense pivots (or gradients already gathered, read in sequence) are checked first, into a 4 B/pivot scratch:
  // neighbouring pivots share cache lines, so the two passes lose little overlap, and the scratch is a third of the
  // backup's fresh memory. Sparse pivots run the speculative pass (see the top of this file).
  if (checked && (!dense || k * kCheckFirstDensityInverse >= total)) {
    at::Tensor scratch = scratch_of(workspace, k, exp_avg);
    float* sc = scratch.data_ptr<float>();
    std::vector<GatherFn> gfns(n_tensors, nullptr);
    for (int64_t i = 0; i < n_tensors; ++i) {
      gfns[i] = pick_gather(dense ? g_keep[i].scalar_type() : pg.scalar_type(), dense);
    }
    std::vector<int> verdict(chunks.size(), 0);
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        const Chunk& ch = chunks[ci];
        const void* grad = dense ? g_keep[ch.tensor].const_data_ptr() : pg_base + ch.begin * pg_size;
        verdict[ci] = gfns[ch.tensor](grad, idx + ch.begin, sc + ch.begin, ch.end - ch.begin, numels[ch.tensor], c);
      }
    });
    if (std::find(verdict.begin(), verdict.end(), 1) != verdict.end()) {
      nonfinite->fill_(1.0);
      return;
    }
    // The update reads the checked fp32 gradients (already unscaled and clipped).
    Coeffs c2 = c;
    c2.has_scale = false;
    c2.has_coef = false;
    std::vector<ChunkFn> ufns(n_tensors, nullptr);
    for (int64_t i = 0; i < n_tensors; ++i) {
      ufns[i] = pick(params[i].scalar_type(), at::kFloat, false, master.has_value());
    }
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        const Chunk& ch = chunks[ci];
        ufns[ch.tensor](params[ch.tensor].data_ptr(), sc + ch.begin, idx + ch.begin, m + ch.begin, v + ch.begin,
                        ms ? ms + ch.begin : nullptr, ch.end - ch.begin, numels[ch.tensor], c2,
                        Backup{nullptr, nullptr, nullptr});
      }
    });
    return;
  }
  // The checked step's backup of the old m, v, θ (see the top of this file); freed when the call returns.
  at::Tensor backup = checked ? scratch_of(workspace, 3 * k, exp_avg) : at::Tensor();
  float* bk_base = checked ? backup.data_ptr<float>() : nullptr;
  std::vector<uint32_t> bad(chunks.size(), 0);
  auto backup_of = [&](const Chunk& ch) {
    return checked ? Backup{bk_base + ch.begin, bk_base + k + ch.begin, bk_base + 2 * k + ch.begin}
                   : Backup{nullptr, nullptr, nullptr};
  };
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      const Chunk& ch = chunks[ci];
      const void* grad = dense ? g_keep[ch.tensor].const_data_ptr() : pg_base + ch.begin * pg_size;
      bad[ci] = fns[ch.tensor](params[ch.tensor].data_ptr(), grad, idx + ch.begin, m + ch.begin, v + ch.begin,
                               ms ? ms + ch.begin : nullptr, ch.end - ch.begin, numels[ch.tensor], c, backup_of(ch));
    }
  });
  if (!checked || std::find(bad.begin(), bad.end(), 1u) == bad.end()) {
    return;
  }
  std::vector<RestoreFn> rfns(n_tensors, nullptr);
  for (int64_t i = 0; i < n_tensors; ++i) {
    rfns[i] = pick_restore(params[i].scalar_type());
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      const Chunk& ch = chunks[ci];
      rfns[ch.tensor](params[ch.tensor].data_ptr(), idx + ch.begin, m + ch.begin, v + ch.begin,
                      ms ? ms + ch.begin : nullptr, ch.end - ch.begin, numels[ch.tensor], backup_of(ch));
    }
  });
  nonfinite->fill_(1.0);
}

}  // namespace ppt_fast
