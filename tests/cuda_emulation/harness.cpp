#define PPT_FAST_HOST_EMULATION 1
#include "prelude.h"  // must come first: it redefines the CUDA keywords for host code
#if defined(EMU_SELECT)
#include "select_pivots.cu"
#elif defined(EMU_ADAM)
#include "sparse_adamw_step.cu"
#else
#include "sensitivity_accumulate.cu"
#endif
#include <cstdio>
#include <cstdlib>
// Input (stdin, little-endian): op (i32: 0 select, 1 sensitivity), then
//  select: T (i32), k (i64), per tensor: dtype (i32), numel (i64), offset (i32, elements to misalign by), raw data.
//  sensitivity: T, mode (i32), per tensor: score dtype, grad dtype, param dtype (i32 x3), numel (i64), offset, raw
//  score, grad, param. Output (stdout): select -> counts (i64 x T), indices (i32 x k); sensitivity -> raw scores.
static void rd(void* p, size_t n) { if (fread(p, 1, n, stdin) != n) { fprintf(stderr, "short input\n"); exit(2); } }
template <class T> T rdv() { T v; rd(&v, sizeof v); return v; }
static size_t esize(int d) { return d == 0 ? 4 : 2; }
static char* load_buf(int dtype, int64_t n, int off) {
  char* base = static_cast<char*>(aligned_alloc(256, (n + off) * esize(dtype) + 256));
  rd(base + off * esize(dtype), n * esize(dtype));
  return base + off * esize(dtype);
}
int main() {
  using namespace ppt_fast::cuda;
  const int op = rdv<int32_t>();
  const int T = rdv<int32_t>();
#if defined(EMU_SELECT)
  if (op == 0) {
    const int64_t k = rdv<int64_t>();
    std::vector<ScoreTensor> tab(T);
    int64_t chunks = 0;
    for (int t = 0; t < T; ++t) {
      const int dtype = rdv<int32_t>(); const int64_t n = rdv<int64_t>(); const int off = rdv<int32_t>();
      tab[t].data = load_buf(dtype, n, off); tab[t].numel = n; tab[t].chunk_begin = chunks; tab[t].dtype = dtype;
      tab[t].vec_ok = (reinterpret_cast<uintptr_t>(tab[t].data) & 15) == 0;
      chunks += (n + kSelectChunk - 1) / kSelectChunk;
    }
    const size_t ws = select_pivots_workspace_bytes(T, chunks);
    void* w = aligned_alloc(256, ws + 256);
    std::vector<int64_t> counts(T, -1); std::vector<int32_t> idx(k, -1); int32_t nan_flag = -1;
    cudaError_t e = select_pivots_launch(tab.data(), T, chunks, k, w, ws, counts.data(), idx.data(), &nan_flag, nullptr);
    fprintf(stderr, "err=%d nan=%d chunks=%lld\n", (int)e, nan_flag, (long long)chunks);
    fwrite(&nan_flag, 4, 1, stdout); fwrite(counts.data(), 8, T, stdout); fwrite(idx.data(), 4, k, stdout);
  }
#elif defined(EMU_ADAM)
  if (op == 2) {
    const int64_t k = rdv<int64_t>();
    AdamHyper h; rd(&h, sizeof h);
    const int has_master = rdv<int32_t>(), has_pg = rdv<int32_t>(), pg_dtype = rdv<int32_t>();
    const int has_scale = rdv<int32_t>(); float scale = rdv<float>();
    const int has_inf = rdv<int32_t>(); float inf = rdv<float>();
    const int has_coef = rdv<int32_t>(); float coef = rdv<float>();
    const int checked = rdv<int32_t>(); float nonfinite = 0.f;
    std::vector<AdamTensor> tab(T); std::vector<std::pair<void*, size_t>> outs;
    for (int t = 0; t < T; ++t) {
      const int pd = rdv<int32_t>(), gd = rdv<int32_t>(); const int64_t n = rdv<int64_t>();
      tab[t].param = load_buf(pd, n, 0); tab[t].numel = n; tab[t].param_dtype = pd; tab[t].grad_dtype = gd;
      tab[t].grad = has_pg ? nullptr : load_buf(gd, n, 0); outs.push_back({tab[t].param, n * esize(pd)});
    }
    std::vector<int64_t> offsets(T + 1); rd(offsets.data(), 8 * (T + 1));
    std::vector<int32_t> idx(k); rd(idx.data(), 4 * k);
    std::vector<float> m(k), v(k), master(k); rd(m.data(), 4 * k); rd(v.data(), 4 * k);
    if (has_master) rd(master.data(), 4 * k);
    void* pg = has_pg ? load_buf(pg_dtype, k, 0) : nullptr;
    std::vector<float> scratch(k);
    cudaError_t e = sparse_adamw_step_launch(tab.data(), offsets.data(), T, idx.data(), k, m.data(), v.data(),
                                             has_master ? master.data() : nullptr, pg, pg_dtype,
                                             has_scale ? &scale : nullptr, has_inf ? &inf : nullptr,
                                             has_coef ? &coef : nullptr, checked ? &nonfinite : nullptr,
                                             checked ? scratch.data() : nullptr, h, nullptr);
    fprintf(stderr, "err=%d\n", (int)e);
    for (auto& o : outs) fwrite(o.first, 1, o.second, stdout);
    fwrite(m.data(), 4, k, stdout); fwrite(v.data(), 4, k, stdout); fwrite(master.data(), 4, k, stdout);
    fwrite(&nonfinite, 4, 1, stdout);
  }
#else
  if (op == 1) {
    const int mode = rdv<int32_t>();
    std::vector<SensTensor> tab; int64_t chunks = 0; std::vector<std::pair<void*, size_t>> outs;
    for (int t = 0; t < T; ++t) {
      const int sd = rdv<int32_t>(), gd = rdv<int32_t>(), pd = rdv<int32_t>(); const int64_t n = rdv<int64_t>();
      const int off = rdv<int32_t>();
      SensTensor d{}; d.score = load_buf(sd, n, off); d.grad = load_buf(gd, n, off); d.param = load_buf(pd, n, off);
      d.numel = n; d.chunk_begin = chunks; d.score_dtype = sd; d.grad_dtype = gd; d.param_dtype = pd;
      d.vec_ok = off == 0; outs.push_back({d.score, n * esize(sd)});
      if (n) { tab.push_back(d); chunks += (n + kSensChunk - 1) / kSensChunk; }
    }
    cudaError_t e = sensitivity_accumulate_launch(tab.data(), (int)tab.size(), chunks, mode, nullptr);
    fprintf(stderr, "err=%d\n", (int)e);
    for (auto& o : outs) fwrite(o.first, 1, o.second, stdout);
  }
#endif
  return 0;
}
