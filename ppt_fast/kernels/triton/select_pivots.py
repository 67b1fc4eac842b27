"""Triton kernels + launcher for `select_pivots`: a global top-k by |score| over many tensors, as packed int32 indices.

See `ppt_fast.ops.select_pivots` for the contract. No sort over N and no int64 copy of N:

1. Radix select on the key `bits(|x|)` (the fp32 bit pattern with the sign cleared; its integer order is the order of
   |x|, and it has 31 significant bits). Four histogram passes over the digits `key[30:23]`, `key[22:15]`,
   `key[14:7]` (256 bins) and `key[6:0]` (128 bins), each restricted to the keys whose higher digits equal the prefix
   found so far. Each program histograms its tile in registers (`tl.histogram`) and adds only its non-empty bins to
   the global int64 histogram, so atomics scale with tiles, not entries. Small digits because `tl.histogram` costs
   ~(bins / 32) · log2(bins) instructions per key on a GPU: 2048 bins would make a pass ~10x compute-bound, 256 bins
   keep it near the bandwidth of streaming the keys. The bin holding the k-th largest key is found with a few tiny
   torch ops on the device (a reversed cumsum over <= 256 bins); nothing but the NaN check waits on the host.
2. A count pass: per tile, how many keys are above the threshold and how many equal it.
3. Device scans over the per-tile counts (N / tile entries) hand out the ties in global order and give each tile its
   output position; a compaction pass writes the local int32 indices there, in (tensor, flat index) order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops._errors import NAN_MESSAGE, NaNScoresError
from . import _utils

_NAN_KEY = 0x7F800000  # keys above +inf's bit pattern are NaN
_INT32_MAX = 2**31 - 1
# (shift of the digit, bins, shift that isolates the prefix the keys must match; -1: none)
_PASSES = ((23, 256, -1), (15, 256, 23), (7, 256, 15), (0, 128, 7))
_MAX_BINS = 256

# GPU: 2048 keys per step across 8 warps (8 per thread) and 8 steps per program, so each program adds its histogram
# to the global one once per 16384 keys: few enough atomics that contention on the hot bins (scores crowd into a few
# exponents) stays far below the cost of streaming the keys. The interpreter pays per program and per step.
_BLOCK_GPU, _STEPS_GPU, _WARPS_GPU = 2048, 8, 8
_BLOCK_INTERPRETER, _STEPS_INTERPRETER = 512, 2


@triton.jit
def _load_keys(ptr, offs, n, CODE: tl.constexpr):
    """int32 keys of |x| for the entries `offs` (< n) at `ptr`; 0 past the end. `ptr` points at the scores' bits
    (int32 for fp32, int16 for bf16) or, for fp16, at the values."""
    mask = offs < n
    if CODE == 0:
        # fp32: the bit pattern itself. Integer ops only, so GPU flush-to-zero cannot merge subnormals with 0.
        key = tl.load(ptr + offs, mask=mask, other=0) & 0x7FFFFFFF
    elif CODE == 2:
        # bf16 is the top half of an fp32: widen the bits, no float conversion at all.
        key = (tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) & 0x7FFF) << 16
    else:
        # fp16 -> fp32 is exact (subnormals included); then take the bits.
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return key, mask


@triton.jit
def _radix_histogram_kernel(
    blk_ids,
    score_tab,
    like,
    blk_tid,
    blk_start,
    numels,
    state,
    hist,
    nan_flag,
    CODE: tl.constexpr,
    SHIFT: tl.constexpr,
    BINS: tl.constexpr,
    PREFIX_SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    b = tl.load(blk_ids + tl.program_id(0))
    tid = tl.load(blk_tid + b)
    start = tl.load(blk_start + b)
    n = tl.load(numels + tid)
    ptr = tl.load(score_tab + tid).to(like.dtype)
    prefix = tl.load(state).to(tl.int32)
    counts = tl.zeros((BINS,), dtype=tl.int32)
    excluded = 0
    key_max = 0
    for step in range(STEPS):
        offs = start + step * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        key, valid = _load_keys(ptr, offs, n, CODE)
        if PREFIX_SHIFT >= 0:
            valid = valid & ((key >> PREFIX_SHIFT) == prefix)
        else:
            key_max = tl.maximum(key_max, tl.max(key, axis=0))
        # Entries outside the tile or the prefix are counted in bin 0 and subtracted below (tl.histogram's own mask
        # argument is newer than the oldest Triton we support).
        digit = tl.where(valid, (key >> SHIFT) & (BINS - 1), 0)
        counts += tl.histogram(digit, BINS)
        excluded += BLOCK - tl.sum(valid.to(tl.int32), axis=0)
    bins = tl.arange(0, BINS)
    counts -= tl.where(bins == 0, excluded, 0)
    tl.atomic_add(hist + bins, counts.to(tl.int64), mask=counts > 0)
    if PREFIX_SHIFT < 0:
        tl.atomic_max(nan_flag, key_max)


@triton.jit
def _threshold_count_kernel(
    blk_ids,
    score_tab,
    like,
    blk_tid,
    blk_start,
    numels,
    state,
    blk_gt,
    blk_eq,
    CODE: tl.constexpr,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    b = tl.load(blk_ids + tl.program_id(0))
    tid = tl.load(blk_tid + b)
    start = tl.load(blk_start + b)
    n = tl.load(numels + tid)
    ptr = tl.load(score_tab + tid).to(like.dtype)
    threshold = tl.load(state).to(tl.int32)
    gt = 0
    eq = 0
    for step in range(STEPS):
        offs = start + step * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        key, valid = _load_keys(ptr, offs, n, CODE)
        gt += tl.sum((valid & (key > threshold)).to(tl.int32), axis=0)
        eq += tl.sum((valid & (key == threshold)).to(tl.int32), axis=0)
    tl.store(blk_gt + b, gt.to(tl.int64))
    tl.store(blk_eq + b, eq.to(tl.int64))


@triton.jit
def _compact_kernel(
    blk_ids,
    score_tab,
    like,
    blk_tid,
    blk_start,
    numels,
    state,
    blk_out,
    blk_eq_before,
    out,
    counts,
    CODE: tl.constexpr,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    b = tl.load(blk_ids + tl.program_id(0))
    tid = tl.load(blk_tid + b)
    start = tl.load(blk_start + b)
    n = tl.load(numels + tid)
    ptr = tl.load(score_tab + tid).to(like.dtype)
    threshold = tl.load(state).to(tl.int32)
    ties = tl.load(state + 1)
    # Output positions and tie ranks are global (up to N), so int64; the indices written are local (< 2**31).
    pos = tl.load(blk_out + b)
    eq_seen = tl.load(blk_eq_before + b)
    taken = 0
    for step in range(STEPS):
        offs = start + step * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        key, valid = _load_keys(ptr, offs, n, CODE)
        eq = (valid & (key == threshold)).to(tl.int32)
        # Ties go to the earliest entries in global (tensor, index) order: rank each tie among all ties before it.
        eq_rank = eq_seen + (tl.cumsum(eq, axis=0) - eq).to(tl.int64)
        take = (valid & (key > threshold)) | ((eq != 0) & (eq_rank < ties))
        t = take.to(tl.int32)
        slot = pos + (tl.cumsum(t, axis=0) - t).to(tl.int64)
        tl.store(out + slot, offs.to(tl.int32), mask=take)
        step_taken = tl.sum(t, axis=0)
        pos += step_taken
        taken += step_taken
        eq_seen += tl.sum(eq, axis=0)
    tl.atomic_add(counts + tid, taken.to(tl.int64), mask=taken > 0)


_tile_id_cache = _utils.LRU()


def _tile_ids(numels: list[int], members: list[int], tile: int, device: torch.device) -> torch.Tensor:
    """Global ids (int32) of the tiles of `members` in the tile table over all tensors; cached."""

    def build() -> torch.Tensor:
        tiles = torch.tensor([-(-n // tile) for n in numels], dtype=torch.int64)
        first = torch.cumsum(tiles, 0) - tiles
        ids = [torch.arange(first[i], first[i] + tiles[i], dtype=torch.int32) for i in members]
        return _utils.to_device(torch.cat(ids), device)

    return _tile_id_cache.get((device, tuple(numels), tuple(members), tile), build)


def _descend(hist: torch.Tensor, state: torch.Tensor, bits: int) -> None:
    """Narrow the threshold by one digit, on the device: state = [prefix, k still to find inside the prefix]."""
    above = hist.flip(0).cumsum(0).flip(0)  # above[d] = keys in bins >= d; non-increasing
    digit = (above >= state[1:2]).sum(0, keepdim=True) - 1  # the highest bin with >= k keys at or above it
    state[1:2] -= above.gather(0, digit) - hist.gather(0, digit)
    state[0:1] = (state[0:1] << bits) | digit


def select_pivots_triton(
    scores: list[torch.Tensor],
    k: int,
    *,
    block: int | None = None,
    steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k of |score| over all tensors: `(counts int64 [T], indices int32 [k])`, exactly as
    `_select_pivots_ref` (ties to the earliest (tensor, flat index); indices ascending within each tensor).

    scores: fp32 / bf16 / fp16, contiguous, one device (CUDA, or CPU under TRITON_INTERPRET=1). A NaN raises
    NaNScoresError. `block` (a power of 2) and `steps` override the keys per step and steps per program (tests).
    """
    if not scores:
        raise ValueError("scores is empty; pass at least one tensor")
    device = scores[0].device
    _utils.check_launchable(device)
    numels = [s.numel() for s in scores]
    total = sum(numels)
    if not 0 <= k <= total:
        raise ValueError(f"k={k} must lie in [0, N] where N = {total}")
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(scores):
        if s.device != device:
            raise ValueError(f"scores[{i}] is on {s.device} but scores[0] on {device}; use one device")
        if not s.is_contiguous():
            raise ValueError(f"scores[{i}] is not contiguous; pass scores[{i}].contiguous()")
        if s.numel() > _INT32_MAX:
            raise ValueError(f"scores[{i}] has {s.numel()} entries; local int32 indices need < 2**31 per tensor")
        if s.numel():
            groups.setdefault(_utils.dtype_code(s, f"scores[{i}]"), []).append(i)
    counts = torch.zeros(len(scores), dtype=torch.int64, device=device)
    if k == 0:
        return counts, torch.empty(0, dtype=torch.int32, device=device)
    interp = _utils.interpreting()
    block = block or (_BLOCK_INTERPRETER if interp else _BLOCK_GPU)
    steps = steps or (_STEPS_INTERPRETER if interp else _STEPS_GPU)
    _utils.check_tile(block, "block")

    # One tile table over all tensors in order, so tile b's output position follows from a scan over tiles < b;
    # each dtype group launches over its own list of tile ids (all of them in the usual one-dtype case).
    tile = block * steps
    blk_tid, blk_start = _utils.block_table(numels, range(len(scores)), tile, device)
    n_tiles = blk_tid.numel()
    score_tab = _utils.pointer_table(scores, device)
    numel_tab = _utils.int64_table(numels, device)
    launches = []
    for code, members in groups.items():
        first = scores[members[0]]
        # A tensor of the group's element type (bits for fp32 / bf16) lends its pointer type to the table entries.
        like = (
            first.view(torch.int32)
            if code == _utils.FP32
            else first.view(torch.int16)
            if code == _utils.BF16
            else first
        )
        launches.append((code, _tile_ids(numels, members, tile, device), like))

    def launch(kernel, *args, **consts) -> None:
        for code, ids, like in launches:
            kernel[(ids.numel(),)](
                ids,
                score_tab,
                like,
                blk_tid,
                blk_start,
                numel_tab,
                *args,
                CODE=code,
                BLOCK=block,
                STEPS=steps,
                **consts,
            )

    # [threshold prefix so far, keys left to place]
    state = _utils.to_device(torch.tensor([0, k], dtype=torch.int64), device)
    hist = torch.empty(_MAX_BINS, dtype=torch.int64, device=device)
    nan_flag = torch.zeros(1, dtype=torch.int32, device=device)
    opts = _utils.gpu_options(num_warps=_WARPS_GPU, enable_fp_fusion=False)
    with _utils.on_device(device):
        for shift, bins, prefix_shift in _PASSES:
            h = hist[:bins]
            h.zero_()
            launch(
                _radix_histogram_kernel, state, h, nan_flag, SHIFT=shift, BINS=bins, PREFIX_SHIFT=prefix_shift, **opts
            )
            if prefix_shift < 0 and int(nan_flag.item()) > _NAN_KEY:
                raise NaNScoresError(NAN_MESSAGE)
            _descend(h, state, bins.bit_length() - 1)

        blk_gt = torch.empty(n_tiles, dtype=torch.int64, device=device)
        blk_eq = torch.empty(n_tiles, dtype=torch.int64, device=device)
        launch(_threshold_count_kernel, state, blk_gt, blk_eq, **opts)
        # Scans over N / tile entries: where each tile's ties rank globally, how many it may take, where it writes.
        eq_before = torch.cumsum(blk_eq, 0) - blk_eq
        ties_taken = torch.minimum((state[1:2] - eq_before).clamp_(min=0), blk_eq)
        blk_take = blk_gt + ties_taken
        blk_out = torch.cumsum(blk_take, 0) - blk_take
        indices = torch.empty(k, dtype=torch.int32, device=device)
        launch(_compact_kernel, state, blk_out, eq_before, indices, counts, **opts)
    return counts, indices
