"""select_pivots: a global top-k over many score tensors, returned as a packed PivotSet.

Contract
- Entries are ranked by **magnitude** |score| (so a signed `sgd_delta` buffer ranks by |Σg|). Scores may be fp32,
  bf16 or fp16; they are compared as fp32 (exact for the 16-bit types).
- Exactly k entries come back. Ties at the threshold are broken deterministically: among entries whose magnitude
  equals the k-th largest, the ones earliest in (tensor position, flat index) order are taken.
- NaN anywhere is an error naming the tensor.
- No sort over N and no int64 copy of N: the threshold is found by a two-pass radix select on the fp32 bit pattern
  (|x| as an int32 is monotone in x): a 65536-bin histogram of the high 16 bits, then one of the low 16 bits inside
  the bin that holds the k-th entry. A compaction pass then writes the packed int32 local indices (sorted within
  each tensor) and per-tensor counts.

The tensor-level op `ppt_fast::select_pivots_packed(scores, k) -> (counts int64 [T], indices int32 [k])` is what the
backends implement (and what `torch.library.opcheck` checks); `select_pivots` wraps it into a PivotSet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .. import _backend
from ..pivots import PivotSet
from . import _checks
from ._errors import NAN_MESSAGE, NaNScoresError

SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP = "select_pivots"
_NAN_KEY = 0x7F800000  # keys above +inf's bit pattern are NaN
_REF_CHUNK = 1 << 22  # the reference walks tensors in chunks so its temporaries stay O(chunk), not O(N)


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys whose integer order is the order of |x| (fp32 bit pattern with the sign cleared)."""
    return x.detach().float().abs().view(torch.int32)


def _histogram(keys: torch.Tensor, shift: int, prefix: int | None) -> torch.Tensor:
    """65536-bin histogram of the 16-bit digit `(keys >> shift) & 0xFFFF`, restricted to keys whose high digit is
    `prefix` when given."""
    if prefix is not None:
        keys = keys[(keys >> 16) == prefix]
    digits = (keys >> shift) & 0xFFFF
    return torch.bincount(digits.to(torch.int32), minlength=65536)


def _find_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and how many entries lie in higher bins."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[b] = entries in bins >= b
    b = int(torch.nonzero(above >= k).max().item())
    return b, int(above[b].item() - hist[b].item())


def _chunks(t: torch.Tensor):
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _REF_CHUNK):
        yield start, flat[start : start + _REF_CHUNK]


def _select_pivots_ref(scores: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference two-pass radix select + compaction (chunked torch ops; the contract, not the fast path)."""
    device = scores[0].device
    counts = torch.zeros(len(scores), dtype=torch.int64)
    if k == 0:
        return counts.to(device), torch.empty(0, dtype=torch.int32, device=device)
    # pass 1: high 16 bits (+ NaN detection)
    hist = torch.zeros(65536, dtype=torch.int64, device=device)
    for s in scores:
        for _, chunk in _chunks(s):
            keys = magnitude_keys(chunk)
            if bool((keys > _NAN_KEY).any()):
                raise NaNScoresError(NAN_MESSAGE)
            hist += _histogram(keys, 16, None)
    hi, above_hi = _find_bin(hist, k)
    # pass 2: low 16 bits inside the high bin
    hist.zero_()
    for s in scores:
        for _, chunk in _chunks(s):
            hist += _histogram(magnitude_keys(chunk), 0, hi)
    lo, above_lo = _find_bin(hist, k - above_hi)
    threshold = (hi << 16) | lo
    ties_left = k - above_hi - above_lo  # entries equal to the threshold still to take, earliest first
    # pass 3: compaction
    parts = []
    for i, s in enumerate(scores):
        for start, chunk in _chunks(s):
            keys = magnitude_keys(chunk)
            take = keys > threshold
            if ties_left > 0:
                eq = torch.nonzero(keys == threshold).reshape(-1)[:ties_left]
                ties_left -= eq.numel()
                take[eq] = True
            idx = torch.nonzero(take).reshape(-1)
            counts[i] += idx.numel()
            parts.append((idx + start).to(torch.int32))
    indices = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32, device=device)
    assert indices.numel() == k, (indices.numel(), k)
    return counts.to(device), indices


def _run(scores: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = scores[0].device
    backend = _backend.select(_OP, device)
    if backend == "ref":
        return _select_pivots_ref(scores, k)
    if backend == "cpp":
        return torch.ops.ppt_fast._select_pivots_cpp(scores, k)
    if backend == "cuda":
        return torch.ops.ppt_fast._select_pivots_cuda(scores, k)
    from ..kernels.triton.select_pivots import select_pivots_triton

    return select_pivots_triton(scores, k)


@torch.library.custom_op("ppt_fast::select_pivots_packed", mutates_args=())
def _select_pivots_packed(scores: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-level op: per-tensor pivot counts (int64 [T]) and packed local indices (int32 [k])."""
    counts, indices = _run(scores, k)
    return counts, indices


@_select_pivots_packed.register_fake
def _(scores, k):
    device = scores[0].device
    return (
        torch.empty(len(scores), dtype=torch.int64, device=device),
        torch.empty(k, dtype=torch.int32, device=device),
    )


def resolve_k(total: int, ratio: float | None, count: int | None) -> int:
    """k from exactly one of ratio (in (0, 1]; k = max(1, round(ratio·N))) or count (0 <= count <= N)."""
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of ratio= (a fraction in (0, 1]) or count= (a number of pivots)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio):
            raise TypeError(f"ratio must be a number in (0, 1], got {ratio!r}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio={ratio} is outside (0, 1]; 1 % density is ratio=0.01")
        return min(total, max(1, round(ratio * total))) if total else 0
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int, got {count!r}")
    if count < 0 or count > total:
        raise ValueError(f"count={count} must lie in [0, N] where N = {total} entries in scope; lower it or use ratio=")
    return count


def _nan_error(scores: Sequence[torch.Tensor], names: Sequence[str]) -> ValueError:
    bad = [n for n, s in zip(names, scores) if bool(torch.isnan(s).any())]
    return ValueError(
        f"NaN scores in tensor(s) {bad}: the gradients that fed them were NaN (a diverged loss or an fp16 overflow); "
        "fix the sensitivity pass (lower lr, use bf16/fp32, skip bad batches) and accumulate again"
    )


def select_pivots(
    scores: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    ratio: float | None = None,
    count: int | None = None,
    names: Sequence[str] | None = None,
    per_tensor: bool = False,
) -> PivotSet:
    """Keep the k entries of largest |score| across all tensors (a global top-k), as a PivotSet.

    Args:
        scores: score tensors (fp32 / bf16 / fp16, any shape, one device), or a name -> tensor mapping.
        ratio: keep k = max(1, round(ratio * N)) of the N entries; ratio in (0, 1].
        count: keep exactly `count` entries (0 <= count <= N). Exactly one of ratio / count.
        names: tensor names for the PivotSet (default "0", "1", ...; taken from the mapping's keys if a mapping).
        per_tensor: select within each tensor instead (ratio of each tensor, or `count` per tensor).

    Ties at the threshold go to the earliest entries in (tensor position, flat index) order, so exactly k come back.
    """
    if isinstance(scores, Mapping):
        if names is not None:
            raise ValueError("names= is taken from the mapping's keys; pass a list of tensors to give names separately")
        names = list(scores.keys())
        scores = list(scores.values())
    scores = _checks.as_tensor_list(scores, "scores")
    if not scores:
        raise ValueError("scores is empty: the scope selected no tensors; check the scope's name globs")
    names = [str(i) for i in range(len(scores))] if names is None else [str(n) for n in names]
    _checks.check_same_length(scores, names, "scores", "names")
    device = _checks.common_device(scores, "scores")
    _checks.check_dtypes(scores, "scores", SCORE_DTYPES)
    flat = _checks.contiguous_all(scores)
    shapes = [s.shape for s in scores]
    if per_tensor:
        parts, offsets = [], [0]
        for name, s in zip(names, flat):
            k_i = resolve_k(s.numel(), ratio, None) if ratio is not None else resolve_k(s.numel(), None, count)
            sub = select_pivots([s], count=k_i, names=[name])
            parts.append(sub.indices)
            offsets.append(offsets[-1] + sub.count)
        return PivotSet(names, shapes, offsets, torch.cat(parts))
    total = sum(s.numel() for s in flat)
    k = resolve_k(total, ratio, count)
    try:
        counts, indices = torch.ops.ppt_fast.select_pivots_packed(flat, k)
    except Exception as exc:  # C++ / CUDA backends raise RuntimeError with the same marker
        if NAN_MESSAGE in str(exc):
            raise _nan_error(flat, names) from None
        raise
    offsets = torch.zeros(len(flat) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts.cpu(), 0)
    return PivotSet(names, shapes, offsets, indices.to(device))
