"""Triton kernel + launcher for `pivot_grad_norm`: the norm of the gradients at the pivots of all tensors.

See `ppt_fast.ops.pivot_grad_norm` for the contract. One program per tile of pivots (the tile table of
`sparse_adamw_step`, so a tile never straddles two tensors) writes one fp32 partial (sum of |g|^p, or max |g|) and
two counts (NaNs, infs); torch then reduces the few thousand partials. Two launches and no atomics: the result is
deterministic, and no host sync is needed (the caller gets a device tensor).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _utils
from .sparse_adamw_step import load_pivot_grads, pivot_tile

_TILE_GPU, _WARPS_GPU = 1024, 4
_TILE_INTERPRETER = 256
_L2, _L1, _INF, _P = 0, 1, 2, 3


@triton.jit
def _pivot_grad_norm_kernel(
    grad_tab,
    g_like,
    pivot_grads,
    blk_tid,
    blk_start,
    offsets,
    indices,
    numel_tab,
    partial,
    bad,
    p,
    PIVOT_GRADS: tl.constexpr,
    KIND: tl.constexpr,
    TILE: tl.constexpr,
):
    tid, j, end = pivot_tile(blk_tid, blk_start, offsets, TILE)
    mask = j < end
    g = load_pivot_grads(grad_tab, g_like, pivot_grads, indices, numel_tab, tid, j, mask, PIVOT_GRADS)
    a = tl.abs(g)
    is_nan = mask & (a != a)
    is_inf = mask & (a == float("inf"))
    a = tl.where(is_nan | is_inf | ~mask, 0.0, a)
    if KIND == 0:
        r = tl.sum(a * a, axis=0)
    elif KIND == 1:
        r = tl.sum(a, axis=0)
    elif KIND == 2:
        r = tl.max(a, axis=0)
    else:
        r = tl.sum(tl.where(a > 0.0, tl.exp2(p * tl.log2(tl.maximum(a, 1e-30))), 0.0), axis=0)
    pid = tl.program_id(0)
    tl.store(partial + pid, r)
    tl.store(bad + 2 * pid, tl.sum(tl.where(is_nan, 1, 0), axis=0))
    tl.store(bad + 2 * pid + 1, tl.sum(tl.where(is_inf, 1, 0), axis=0))


def pivot_grad_norm_triton(
    grads: list[torch.Tensor],
    offsets: list[int],
    indices: torch.Tensor,
    pivot_grads: torch.Tensor | None,
    norm_type: float,
    *,
    tile: int | None = None,
) -> torch.Tensor:
    """The norm (0-d fp32 tensor on the indices' device). Arguments are the op's, already checked by
    `ppt_fast.ops.pivot_grad_norm`; `tile` overrides the pivots per program (tests)."""
    device = indices.device
    k = int(offsets[-1])
    if k == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    _utils.check_launchable(device)
    use_pivot_grads = pivot_grads is not None
    n_tensors = len(offsets) - 1
    tile = _utils.check_tile(tile or (_TILE_INTERPRETER if _utils.interpreting() else _TILE_GPU))
    lengths = [offsets[i + 1] - offsets[i] for i in range(n_tensors)]
    kind = _L2 if norm_type == 2.0 else _L1 if norm_type == 1.0 else _INF if math.isinf(norm_type) else _P
    if use_pivot_grads:
        groups = {None: [i for i in range(n_tensors) if lengths[i]]}
        grad_tab = indices
        numel_tab = _utils.int64_table([0] * n_tensors, device)
    else:
        groups: dict[torch.dtype | None, list[int]] = {}
        for i in range(n_tensors):
            if lengths[i]:
                _utils.dtype_code(grads[i], f"grads[{i}]")
                groups.setdefault(grads[i].dtype, []).append(i)
        grad_tab = _utils.pointer_table(grads, device)
        numel_tab = _utils.int64_table([g.numel() for g in grads], device)
    offset_tab = _utils.int64_table(offsets, device)
    partials, bads = [], []
    with _utils.on_device(device):
        for members in groups.values():
            blk_tid, blk_start = _utils.block_table(lengths, members, tile, device, base=offsets[:-1])
            n_prog = blk_tid.numel()
            partial = torch.empty(n_prog, dtype=torch.float32, device=device)
            bad = torch.empty(2 * n_prog, dtype=torch.int32, device=device)
            _pivot_grad_norm_kernel[(n_prog,)](
                grad_tab,
                pivot_grads if use_pivot_grads else grads[members[0]],
                pivot_grads if use_pivot_grads else indices,
                blk_tid,
                blk_start,
                offset_tab,
                indices,
                numel_tab,
                partial,
                bad,
                float(norm_type) if kind == _P else 1.0,
                PIVOT_GRADS=use_pivot_grads,
                KIND=kind,
                TILE=tile,
                **_utils.gpu_options(num_warps=_WARPS_GPU),
            )
            partials.append(partial)
            bads.append(bad.view(-1, 2))
    part = torch.cat(partials)
    counts = torch.cat(bads).sum(0)
    if kind == _INF:
        norm = part.max()
    elif kind == _P:
        norm = part.sum().pow(1.0 / norm_type)
    elif kind == _L2:
        norm = part.sum().sqrt()
    else:
        norm = part.sum()
    # NaN wins over inf, as in torch.linalg.vector_norm; all on the device, no host sync.
    norm = torch.where(counts[1] > 0, torch.full_like(norm, math.inf), norm)
    return torch.where(counts[0] > 0, torch.full_like(norm, math.nan), norm)
