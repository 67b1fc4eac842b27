// Global top-k by magnitude over many score tensors: two-pass radix select, then a parallel compaction.
//
// Why not sort: N reaches billions (musicgen-large has 3.3 B entries); sorting or topk needs O(N) int64 indices.
// Here the only O(N) work is four streaming reads of the scores and the only large allocation is the output.
//   pass 1  per-thread 65536-bin histograms of the key's high 16 bits (+ NaN detection) -> high digit `hi` of the
//           k-th largest key and how many keys lie above its bin
//   pass 2  the same on the low 16 bits of the keys whose high digit is `hi` -> the threshold key T
//   pass 3  per chunk: #keys > T and #keys == T; a serial scan over the chunks (in global order) hands the
//           `ties_left` threshold entries to the earliest chunks and gives each chunk its output offset
//   pass 4  every chunk writes its local indices at its offset: sorted within each tensor, ties earliest-first.
// Counts and offsets are int64 (totals may pass 2^31); indices are int32 local to their tensor.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "float_bits.h"
#include "ops.h"

namespace ppt_fast {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kBins = 65536;

struct Chunk {
  int64_t tensor;
  int64_t start;  // flat index of the chunk's first entry inside its tensor
  int64_t n;
};

// Runs `body(keys_fn)` with the chunk's key loader specialised on the score dtype, so the inner loops are
// monomorphic (no per-element dtype switch).
template <typename F>
void with_keys(const at::Tensor& t, const Chunk& ch, F&& body) {
  switch (t.scalar_type()) {
    case at::kFloat: {
      const float* p = t.const_data_ptr<float>() + ch.start;
      body([p](int64_t j) { return magnitude_key(p[j]); });
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = t.const_data_ptr<c10::BFloat16>() + ch.start;
      body([p](int64_t j) { return magnitude_key(p[j]); });
      break;
    }
    case at::kHalf: {
      const c10::Half* p = t.const_data_ptr<c10::Half>() + ch.start;
      body([p](int64_t j) { return magnitude_key(p[j]); });
      break;
    }
    default:
      TORCH_CHECK(false, "ppt_fast: scores must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// The bin holding the k-th largest key (1-based k <= total) and how many keys lie in higher bins.
std::pair<uint32_t, int64_t> find_bin(const std::vector<int64_t>& hist, int64_t k) {
  int64_t above = 0;
  for (int64_t b = kBins - 1; b >= 0; --b) {
    if (above + hist[b] >= k) {
      return {static_cast<uint32_t>(b), above};
    }
    above += hist[b];
  }
  TORCH_CHECK(false, "ppt_fast: internal error: k exceeds the histogram total");
}

// Per-thread histograms, merged once at the end. at::parallel_for calls the body once per thread with one
// contiguous range of chunks, so each thread fills a private 512 KiB table (no atomics, no shared cache lines).
// The private table is uint32 (256 KiB, half of int64's, so it stays in L2 next to the streamed scores) and is
// flushed into the int64 totals every kFlushChunks chunks, before any bin could pass 2^32.
constexpr int64_t kFlushChunks = (int64_t(1) << 31) / kChunk;

template <typename Fill>
std::vector<int64_t> histogram(const std::vector<Chunk>& chunks, Fill&& fill) {
  std::vector<int64_t> hist(kBins, 0);
  std::mutex merge;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> local(kBins, 0);
    for (int64_t c0 = begin; c0 < end; c0 += kFlushChunks) {
      const int64_t c1 = std::min(end, c0 + kFlushChunks);
      for (int64_t c = c0; c < c1; ++c) {
        fill(c, local.data());
      }
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t b = 0; b < kBins; ++b) {
        hist[b] += local[b];
        local[b] = 0;
      }
    }
  });
  return hist;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> select_pivots_cpp(at::TensorList scores_in, int64_t k) {
  TORCH_CHECK(!scores_in.empty(), "ppt_fast: scores is empty (the scope selected no tensors)");
  std::vector<at::Tensor> scores;
  scores.reserve(scores_in.size());
  int64_t total = 0;
  for (size_t i = 0; i < scores_in.size(); ++i) {
    const at::Tensor& s = scores_in[i];
    TORCH_CHECK(s.device().is_cpu(), "ppt_fast: scores[", i, "] must be a CPU tensor for the cpp backend");
    const auto dt = s.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "ppt_fast: scores[", i,
                "] has dtype ", dt, "; supported: float32, bfloat16, float16");
    TORCH_CHECK(s.numel() - 1 <= INT32_MAX, "ppt_fast: scores[", i, "] has more than 2^31 entries");
    scores.push_back(s.contiguous());
    total += s.numel();
  }
  TORCH_CHECK(k >= 0 && k <= total, "ppt_fast: k=", k, " must lie in [0, N] with N = ", total, " entries");
  const int64_t n_tensors = static_cast<int64_t>(scores.size());
  at::Tensor counts = at::zeros({n_tensors}, at::TensorOptions().dtype(at::kLong));
  at::Tensor indices = at::empty({k}, at::TensorOptions().dtype(at::kInt));
  if (k == 0) {
    return {counts, indices};
  }

  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<size_t>(total / kChunk + n_tensors));
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t n = scores[i].numel();
    for (int64_t start = 0; start < n; start += kChunk) {
      chunks.push_back({i, start, std::min(kChunk, n - start)});
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());

  // pass 1: high digit; the largest key per chunk finds NaNs without a branch in the loop.
  std::vector<uint32_t> chunk_max(n_chunks, 0);
  const auto hist_hi = histogram(chunks, [&](int64_t c, uint32_t* row) {
    const Chunk& ch = chunks[c];
    with_keys(scores[ch.tensor], ch, [&](auto key) {
      uint32_t mx = 0;
      for (int64_t j = 0; j < ch.n; ++j) {
        const uint32_t kj = key(j);
        mx = std::max(mx, kj);
        ++row[kj >> 16];
      }
      chunk_max[c] = mx;
    });
  });
  for (int64_t c = 0; c < n_chunks; ++c) {
    TORCH_CHECK(chunk_max[c] <= kNaNKey, "ppt_fast: NaN score in scores[", chunks[c].tensor, "] (flat entries ",
                chunks[c].start, "..", chunks[c].start + chunks[c].n - 1, ")");
  }
  const std::pair<uint32_t, int64_t> bin_hi = find_bin(hist_hi, k);
  const uint32_t hi = bin_hi.first;
  const int64_t above_hi = bin_hi.second;

  // pass 2: low digit inside bin `hi`.
  const auto hist_lo = histogram(chunks, [&](int64_t c, uint32_t* row) {
    const Chunk& ch = chunks[c];
    with_keys(scores[ch.tensor], ch, [&](auto key) {
      for (int64_t j = 0; j < ch.n; ++j) {
        const uint32_t kj = key(j);
        if ((kj >> 16) == hi) {
          ++row[kj & 0xFFFFu];
        }
      }
    });
  });
  const std::pair<uint32_t, int64_t> bin_lo = find_bin(hist_lo, k - above_hi);
  const uint32_t lo = bin_lo.first;
  const int64_t above_lo = bin_lo.second;
  const uint32_t threshold = (hi << 16) | lo;
  int64_t ties_left = k - above_hi - above_lo;  // entries equal to the threshold still to hand out, earliest first

  // pass 3: per-chunk counts.
  std::vector<int64_t> n_greater(n_chunks), n_equal(n_chunks);
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      with_keys(scores[chunks[c].tensor], chunks[c], [&](auto key) {
        int64_t gt = 0, eq = 0;
        for (int64_t j = 0; j < chunks[c].n; ++j) {
          const uint32_t kj = key(j);
          gt += kj > threshold;
          eq += kj == threshold;
        }
        n_greater[c] = gt;
        n_equal[c] = eq;
      });
    }
  });
  // Serial scan in global (tensor, index) order: that order is what makes the tie rule "earliest first".
  std::vector<int64_t> out_offset(n_chunks), ties_taken(n_chunks);
  int64_t* counts_p = counts.data_ptr<int64_t>();
  int64_t running = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    ties_taken[c] = std::min(n_equal[c], ties_left);
    ties_left -= ties_taken[c];
    out_offset[c] = running;
    running += n_greater[c] + ties_taken[c];
    counts_p[chunks[c].tensor] += n_greater[c] + ties_taken[c];
  }
  TORCH_CHECK(running == k, "ppt_fast: internal error: selected ", running, " entries, expected ", k);

  // pass 4: write local indices.
  int32_t* out = indices.data_ptr<int32_t>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      if (n_greater[c] + ties_taken[c] == 0) {
        continue;
      }
      with_keys(scores[ch.tensor], ch, [&](auto key) {
        int32_t* dst = out + out_offset[c];
        int64_t ties = ties_taken[c];
        const int32_t base = static_cast<int32_t>(ch.start);
        for (int64_t j = 0; j < ch.n; ++j) {
          const uint32_t kj = key(j);
          // Taken entries are rare (k/N is ~1 %), so this branch is well predicted.
          if (kj > threshold || (kj == threshold && ties > 0)) {
            ties -= kj == threshold;
            *dst++ = base + static_cast<int32_t>(j);
          }
        }
      });
    }
  });
  return {counts, indices};
}

}  // namespace ppt_fast
