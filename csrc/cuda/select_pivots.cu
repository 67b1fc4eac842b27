// select_pivots: global top-k by |score| over many tensors, as packed int32 local indices + per-tensor counts.
//
// No sort of N and no int64 copy of N. Keys are the fp32 bit patterns of |x| (sign cleared), whose integer order is
// the order of |x|; a NaN is any key above +inf's pattern. The threshold key (the k-th largest) is found by a radix
// select over the 31 key bits in three digits of 11 / 11 / 9 bits: each pass streams all scores once and builds a
// histogram of the next digit among the keys that share the prefix found so far. 11 bits keep a block's histogram
// at 8 KB of shared memory (2048 x u32), so several blocks share an SM and the shared atomics of different blocks
// overlap; a 16-bit digit would need 256 KB, more than an SM has. Each block flushes its non-zero bins into one
// u64 global histogram (totals above 2^31 are fine). A one-warp kernel then finds the bin holding the k-th key and
// narrows the prefix; everything stays on the device, so the whole selection needs no host round trip.
//
// Compaction (stable, ties to the earliest (tensor, flat index)):
//   count: per chunk of 16384 entries, how many keys are > threshold (gt) and == threshold (eq);
//   scan:  one block scans the per-chunk counts in order (u64 running totals) into each chunk's output base and the
//          number of its threshold-equal entries still to take (the first `ties` equal entries overall are taken);
//   write: per chunk, a block scan of (gt, eq) packed into one u32 gives every thread its output slot; indices are
//          written in ascending order.
// Extra memory: 16 KB histogram + 16 B per chunk of 16384 entries (~0.1 % of fp32 scores).
#include "common.cuh"

namespace ppt_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 8;
constexpr int kTile = kThreads * kVec;                              // 2048 entries: one vector per thread
constexpr int kTilesPerChunk = static_cast<int>(kSelectChunk / kTile);  // 8
static_assert(kTilesPerChunk * kTile == kSelectChunk, "a chunk is a whole number of tiles");
constexpr int kMaxBins = 2048;
constexpr uint32_t kNaNKey = 0x7F800000u;  // keys above +inf are NaN
constexpr int kScanThreads = 1024;

// Digits, most significant first: bits [30:20], [19:9], [8:0] (bit 31 is the cleared sign).
constexpr int kPasses = 3;
__host__ __device__ constexpr int digit_shift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 9 : 0); }
__host__ __device__ constexpr int digit_width(int pass) { return pass == 2 ? 9 : 11; }

struct RadixState {
  unsigned long long hist[kMaxBins];
  long long remaining;  // rank of the wanted key among keys sharing `prefix` (1-based, counted from the top)
  uint32_t prefix;      // the key bits found so far (right-aligned)
  uint32_t pad;
};

struct Workspace {
  RadixState* state;
  uint32_t* chunk_packed;  // per chunk: gt | eq << 16 (each <= 16384 fits 16 bits)
  long long* chunk_base;   // per chunk: first output slot
  int32_t* chunk_take_eq;  // per chunk: how many of its threshold-equal entries are taken
};

__host__ __device__ inline size_t align_up(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

inline Workspace carve(void* base, int64_t total_chunks) {
  char* p = static_cast<char*>(base);
  Workspace w;
  w.state = reinterpret_cast<RadixState*>(p);
  p += align_up(sizeof(RadixState));
  w.chunk_packed = reinterpret_cast<uint32_t*>(p);
  p += align_up(sizeof(uint32_t) * total_chunks);
  w.chunk_base = reinterpret_cast<long long*>(p);
  p += align_up(sizeof(long long) * total_chunks);
  w.chunk_take_eq = reinterpret_cast<int32_t*>(p);
  return w;
}

// ------------------------------------------------------------------------------------------------ keys
__device__ __forceinline__ uint32_t key_of(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

// Keys of the 8 consecutive entries [i, i + 8) of a chunk ending at `end`; returns how many are valid.
template <typename T>
__device__ __forceinline__ int load_keys8(const T* data, int64_t i, int64_t end, bool vec, uint32_t (&key)[8]) {
  if (vec && i + kVec <= end) {
    float v[8];
    detail::load8<T, false>(data + i, v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) key[e] = key_of(v[e]);
    return kVec;
  }
  const int n = i >= end ? 0 : static_cast<int>(end - i < kVec ? end - i : kVec);
#pragma unroll
  for (int e = 0; e < kVec; ++e) key[e] = e < n ? key_of(detail::Elem<T>::to_float(data[i + e])) : 0u;
  return n;
}

struct ChunkRange {
  int tensor;
  int64_t begin;  // local flat index of the chunk's first entry
  int64_t end;
};

__device__ __forceinline__ ChunkRange chunk_range(const ScoreTensor* tensors, int num_tensors, int64_t c) {
  ChunkRange r;
  r.tensor = detail::find_tensor(tensors, num_tensors, c);
  const ScoreTensor& t = tensors[r.tensor];
  r.begin = (c - t.chunk_begin) * kSelectChunk;
  r.end = r.begin + kSelectChunk < t.numel ? r.begin + kSelectChunk : t.numel;
  return r;
}

// ------------------------------------------------------------------------------------------------ block scans
// Exclusive scan of one u32 per thread across the block (in thread order); `total` gets the block's sum.
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, uint32_t& total, uint32_t* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t up = __shfl_up_sync(0xFFFFFFFFu, incl, d);
    if (lane >= d) incl += up;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  uint32_t warp_before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const uint32_t s = warp_sums[w];
    warp_before += w < warp ? s : 0u;
    total += s;
  }
  __syncthreads();  // warp_sums may be reused by the caller's next scan
  return warp_before + incl - v;
}

// ------------------------------------------------------------------------------------------------ kernels
__global__ void init_kernel(RadixState* state, long long k, int32_t* nan_flag, long long* counts, int num_tensors) {
  for (int b = threadIdx.x; b < kMaxBins; b += blockDim.x) state->hist[b] = 0ull;
  for (int t = threadIdx.x; t < num_tensors; t += blockDim.x) counts[t] = 0;
  if (threadIdx.x == 0) {
    state->remaining = k;
    state->prefix = 0u;
    *nan_flag = 0;
  }
}

template <typename T>
__device__ __forceinline__ void hist_chunk(const ScoreTensor& t, const ChunkRange& r, int shift, int width,
                                           uint32_t prefix, bool check_nan, uint32_t* sh, bool& saw_nan) {
  const T* data = static_cast<const T*>(t.data);
  const uint32_t mask = (1u << width) - 1u;
  const int hi_shift = shift + width;  // keys whose bits above the digit equal `prefix` are counted
  // Scores of one tensor have similar magnitudes, so the top digit of a warp's keys lands in a handful of bins and
  // same-address shared atomics serialise. Each thread therefore merges runs of equal bins among its consecutive
  // entries and issues one atomic per run.
  uint32_t run_bin = 0u, run_len = 0u;
  for (int tile = 0; tile < kTilesPerChunk; ++tile) {
    const int64_t i = r.begin + static_cast<int64_t>(tile) * kTile + static_cast<int64_t>(threadIdx.x) * kVec;
    uint32_t key[8];
    const int n = load_keys8<T>(data, i, r.end, t.vec_ok != 0, key);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < n) {
        if (check_nan && key[e] > kNaNKey) saw_nan = true;
        if ((key[e] >> hi_shift) == prefix) {
          const uint32_t bin = (key[e] >> shift) & mask;
          if (run_len != 0u && bin != run_bin) {
            atomicAdd(&sh[run_bin], run_len);
            run_len = 0u;
          }
          run_bin = bin;
          ++run_len;
        }
      }
    }
  }
  if (run_len != 0u) atomicAdd(&sh[run_bin], run_len);
}

__global__ void __launch_bounds__(kThreads) hist_kernel(const ScoreTensor* __restrict__ tensors, int num_tensors,
                                                        int64_t total_chunks, RadixState* state, int pass,
                                                        int32_t* nan_flag) {
  __shared__ uint32_t sh[kMaxBins];
  const int shift = digit_shift(pass), width = digit_width(pass), bins = 1 << width;
  for (int b = threadIdx.x; b < bins; b += kThreads) sh[b] = 0u;
  __syncthreads();
  const uint32_t prefix = state->prefix;
  const bool check_nan = pass == 0;
  bool saw_nan = false;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const ChunkRange r = chunk_range(tensors, num_tensors, c);
    const ScoreTensor& t = tensors[r.tensor];
    switch (t.dtype) {
      case kF16:
        hist_chunk<__half>(t, r, shift, width, prefix, check_nan, sh, saw_nan);
        break;
      case kBF16:
        hist_chunk<__nv_bfloat16>(t, r, shift, width, prefix, check_nan, sh, saw_nan);
        break;
      default:
        hist_chunk<float>(t, r, shift, width, prefix, check_nan, sh, saw_nan);
    }
  }
  if (saw_nan) *nan_flag = 1;  // benign race: every writer stores the same value
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    const uint32_t v = sh[b];
    if (v) atomicAdd(&state->hist[b], static_cast<unsigned long long>(v));
  }
}

// One warp: find the bin holding the `remaining`-th largest key, narrow the prefix, clear the histogram.
__global__ void find_bin_kernel(RadixState* state, int pass) {
  const int lane = threadIdx.x;
  const int width = digit_width(pass), bins = 1 << width, per = bins / 32;
  const long long remaining = state->remaining;
  // Lane l owns bins [bins - (l + 1) * per, bins - l * per): lane 0 holds the largest keys.
  const int hi = bins - lane * per;
  const int lo = hi - per;
  unsigned long long own = 0ull;
  for (int b = lo; b < hi; ++b) own += state->hist[b];
  unsigned long long incl = own;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned long long up = __shfl_up_sync(0xFFFFFFFFu, incl, d);
    if (lane >= d) incl += up;
  }
  const unsigned long long excl = incl - own;
  const unsigned long long want = static_cast<unsigned long long>(remaining);
  if (excl < want && want <= incl) {
    // This lane's bins hold the wanted key; walk them from the top.
    unsigned long long above = excl;
    int b = hi - 1;
    for (; b > lo; --b) {
      const unsigned long long h = state->hist[b];
      if (above + h >= want) break;
      above += h;
    }
    state->prefix = (state->prefix << width) | static_cast<uint32_t>(b);
    state->remaining = remaining - static_cast<long long>(above);
  }
  __syncwarp();
  for (int b = lo; b < hi; ++b) state->hist[b] = 0ull;  // ready for the next pass
}

template <typename T>
__device__ __forceinline__ uint32_t count_chunk(const ScoreTensor& t, const ChunkRange& r, uint32_t thr) {
  const T* data = static_cast<const T*>(t.data);
  uint32_t packed = 0u;
  for (int tile = 0; tile < kTilesPerChunk; ++tile) {
    const int64_t i = r.begin + static_cast<int64_t>(tile) * kTile + static_cast<int64_t>(threadIdx.x) * kVec;
    uint32_t key[8];
    const int n = load_keys8<T>(data, i, r.end, t.vec_ok != 0, key);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < n) packed += key[e] > thr ? 1u : (key[e] == thr ? (1u << 16) : 0u);
    }
  }
  return packed;
}

__global__ void __launch_bounds__(kThreads) count_kernel(const ScoreTensor* __restrict__ tensors, int num_tensors,
                                                         int64_t total_chunks, const RadixState* state,
                                                         uint32_t* chunk_packed) {
  __shared__ uint32_t warp_sums[kWarps];
  const uint32_t thr = state->prefix;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const ChunkRange r = chunk_range(tensors, num_tensors, c);
    const ScoreTensor& t = tensors[r.tensor];
    uint32_t packed;
    switch (t.dtype) {
      case kF16:
        packed = count_chunk<__half>(t, r, thr);
        break;
      case kBF16:
        packed = count_chunk<__nv_bfloat16>(t, r, thr);
        break;
      default:
        packed = count_chunk<float>(t, r, thr);
    }
    // Per-thread counts are <= 64 per field and the chunk totals <= 16384, so the packed fields never carry.
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) packed += __shfl_down_sync(0xFFFFFFFFu, packed, d);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = packed;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t total = 0u;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
      chunk_packed[c] = total;
    }
    __syncthreads();
  }
}

// One block: ordered scan of the chunk counts into output bases, tie quotas and per-tensor counts.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(const ScoreTensor* __restrict__ tensors, int num_tensors,
                                                            int64_t total_chunks, const RadixState* state,
                                                            const uint32_t* chunk_packed, long long* chunk_base,
                                                            int32_t* chunk_take_eq, long long* counts) {
  __shared__ unsigned long long warp_gt[kScanThreads / 32], warp_eq[kScanThreads / 32];
  const long long ties = state->remaining;  // threshold-equal entries to take, earliest first
  const int64_t per = (total_chunks + kScanThreads - 1) / kScanThreads;
  const int64_t c0 = static_cast<int64_t>(threadIdx.x) * per;
  const int64_t c1 = c0 + per < total_chunks ? c0 + per : total_chunks;
  unsigned long long gt = 0ull, eq = 0ull;
  for (int64_t c = c0; c < c1; ++c) {
    const uint32_t p = chunk_packed[c];
    gt += p & 0xFFFFu;
    eq += p >> 16;
  }
  // Exclusive scan of (gt, eq) over threads, in order.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long igt = gt, ieq = eq;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned long long ugt = __shfl_up_sync(0xFFFFFFFFu, igt, d);
    const unsigned long long ueq = __shfl_up_sync(0xFFFFFFFFu, ieq, d);
    if (lane >= d) {
      igt += ugt;
      ieq += ueq;
    }
  }
  if (lane == 31) {
    warp_gt[warp] = igt;
    warp_eq[warp] = ieq;
  }
  __syncthreads();
  unsigned long long gt_before = igt - gt, eq_before = ieq - eq;
  for (int w = 0; w < warp; ++w) {
    gt_before += warp_gt[w];
    eq_before += warp_eq[w];
  }
  if (c0 >= c1) return;
  const unsigned long long quota = static_cast<unsigned long long>(ties);
  int t = detail::find_tensor(tensors, num_tensors, c0);
  long long run = 0;  // pivots of tensor t found in this thread's chunks
  for (int64_t c = c0; c < c1; ++c) {
    while (t + 1 < num_tensors && tensors[t + 1].chunk_begin <= c) {
      if (run) atomicAdd(reinterpret_cast<unsigned long long*>(&counts[t]), static_cast<unsigned long long>(run));
      run = 0;
      ++t;
    }
    const uint32_t p = chunk_packed[c];
    const unsigned long long cgt = p & 0xFFFFu, ceq = p >> 16;
    const unsigned long long eq_taken_before = eq_before < quota ? eq_before : quota;
    const unsigned long long left = quota - eq_taken_before;
    const unsigned long long take = ceq < left ? ceq : left;
    chunk_base[c] = static_cast<long long>(gt_before + eq_taken_before);
    chunk_take_eq[c] = static_cast<int32_t>(take);
    run += static_cast<long long>(cgt + take);
    gt_before += cgt;
    eq_before += ceq;
  }
  if (run) atomicAdd(reinterpret_cast<unsigned long long*>(&counts[t]), static_cast<unsigned long long>(run));
}

template <typename T>
__device__ __forceinline__ void write_chunk(const ScoreTensor& t, const ChunkRange& r, uint32_t thr, long long base,
                                            uint32_t take_eq, int32_t* __restrict__ out, uint32_t* warp_sums) {
  const T* data = static_cast<const T*>(t.data);
  uint32_t gt_run = 0u, eq_run = 0u;  // chunk-level totals of the tiles already written
  for (int tile = 0; tile < kTilesPerChunk; ++tile) {
    const int64_t i = r.begin + static_cast<int64_t>(tile) * kTile + static_cast<int64_t>(threadIdx.x) * kVec;
    uint32_t key[8];
    const int n = load_keys8<T>(data, i, r.end, t.vec_ok != 0, key);
    uint32_t mine = 0u;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < n) mine += key[e] > thr ? 1u : (key[e] == thr ? (1u << 16) : 0u);
    }
    uint32_t tile_total;
    const uint32_t before = block_exclusive_scan(mine, tile_total, warp_sums);
    uint32_t gt_before = gt_run + (before & 0xFFFFu);
    uint32_t eq_before = eq_run + (before >> 16);
    if (mine) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (e >= n) break;
        const int32_t local = static_cast<int32_t>(i + e);
        if (key[e] > thr) {
          const uint32_t eq_taken = eq_before < take_eq ? eq_before : take_eq;
          out[base + gt_before + eq_taken] = local;
          ++gt_before;
        } else if (key[e] == thr) {
          if (eq_before < take_eq) out[base + gt_before + eq_before] = local;
          ++eq_before;
        }
      }
    }
    gt_run += tile_total & 0xFFFFu;
    eq_run += tile_total >> 16;
  }
}

__global__ void __launch_bounds__(kThreads) write_kernel(const ScoreTensor* __restrict__ tensors, int num_tensors,
                                                         int64_t total_chunks, const RadixState* state,
                                                         const long long* chunk_base, const int32_t* chunk_take_eq,
                                                         const uint32_t* chunk_packed, int32_t* out) {
  __shared__ uint32_t warp_sums[kWarps];
  const uint32_t thr = state->prefix;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const uint32_t take_eq = static_cast<uint32_t>(chunk_take_eq[c]);
    if ((chunk_packed[c] & 0xFFFFu) == 0u && take_eq == 0u) continue;  // nothing to write: skip the re-read
    const ChunkRange r = chunk_range(tensors, num_tensors, c);
    const ScoreTensor& t = tensors[r.tensor];
    const long long base = chunk_base[c];
    switch (t.dtype) {
      case kF16:
        write_chunk<__half>(t, r, thr, base, take_eq, out, warp_sums);
        break;
      case kBF16:
        write_chunk<__nv_bfloat16>(t, r, thr, base, take_eq, out, warp_sums);
        break;
      default:
        write_chunk<float>(t, r, thr, base, take_eq, out, warp_sums);
    }
  }
}

}  // namespace

size_t select_pivots_workspace_bytes(int /*num_tensors*/, int64_t total_chunks) {
  const size_t c = static_cast<size_t>(total_chunks > 0 ? total_chunks : 0);
  return align_up(sizeof(RadixState)) + align_up(sizeof(uint32_t) * c) + align_up(sizeof(long long) * c) +
         align_up(sizeof(int32_t) * c);
}

cudaError_t select_pivots_launch(const ScoreTensor* d_tensors, int num_tensors, int64_t total_chunks, int64_t k,
                                 void* d_workspace, size_t workspace_bytes, int64_t* d_counts, int32_t* d_indices,
                                 int32_t* d_nan_flag, cudaStream_t stream) {
  if (num_tensors <= 0 || total_chunks <= 0 || k <= 0) return cudaErrorInvalidValue;
  if (workspace_bytes < select_pivots_workspace_bytes(num_tensors, total_chunks)) return cudaErrorInvalidValue;
  Workspace w = carve(d_workspace, total_chunks);
  long long* counts = reinterpret_cast<long long*>(d_counts);
  PPT_LAUNCH(init_kernel, 1, 256, stream, w.state, static_cast<long long>(k), d_nan_flag, counts, num_tensors);
  // Persistent grids; each block's shared u32 bins see at most total / grid entries, far below 2^32.
  const int64_t resident = static_cast<int64_t>(detail::num_sms()) * 8;
  const unsigned grid = static_cast<unsigned>(total_chunks < resident ? total_chunks : resident);
  for (int pass = 0; pass < kPasses; ++pass) {
    PPT_LAUNCH(hist_kernel, grid, kThreads, stream, d_tensors, num_tensors, total_chunks, w.state, pass, d_nan_flag);
    PPT_LAUNCH(find_bin_kernel, 1, 32, stream, w.state, pass);
  }
  PPT_LAUNCH(count_kernel, grid, kThreads, stream, d_tensors, num_tensors, total_chunks, w.state, w.chunk_packed);
  PPT_LAUNCH(scan_kernel, 1, kScanThreads, stream, d_tensors, num_tensors, total_chunks, w.state, w.chunk_packed,
                                              w.chunk_base, w.chunk_take_eq, counts);
  PPT_LAUNCH(write_kernel, grid, kThreads, stream, d_tensors, num_tensors, total_chunks, w.state, w.chunk_base,
                                              w.chunk_take_eq, w.chunk_packed, d_indices);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ppt_fast
