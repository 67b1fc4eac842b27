"""Triton kernel + launcher for `sparse_adamw_step`: one AdamW step over the pivots of all tensors, one launch.

See `ppt_fast.ops.sparse_adamw_step` for the contract and the exact math. One program per tile of pivots from a
cached tile table over the packed pivot list (a tile never straddles two tensors, so each program reads one parameter
pointer and one gradient pointer). State (m, v, master) is fp32 and streams; θ and g are gathered at the pivots.
`found_inf` is read on the device, so a GradScaler step never waits on the host.

Checked steps (`nonfinite` given) take two launches, since a grid cannot wait for itself: the first gathers every
pivot gradient (unscaled and clipped) into an fp32 scratch and raises the device flag on an inf/NaN; the second is
the update, reading the scratch and emptying every tile when the flag is up. Every gather and store is also masked
by its tensor's size, so no index, however made, reaches outside a parameter or a gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _utils

# Pivots at 1 % density are scattered: each one touches its own 32-B sector of θ and g, so what matters is gathers
# in flight, not vector width. 1024 pivots across 4 warps keeps 8 independent gathers per thread per operand.
_TILE_GPU, _WARPS_GPU = 1024, 4
_TILE_INTERPRETER = 256


@triton.jit
def pivot_tile(blk_tid, blk_start, offsets, TILE: tl.constexpr):
    """The tile this program owns: its tensor id, its pivot positions and the tensor's end in the packed list.
    Positions run up to k, which may pass 2**31: int64."""
    pid = tl.program_id(0)
    tid = tl.load(blk_tid + pid)
    j = tl.load(blk_start + pid) + tl.arange(0, TILE).to(tl.int64)
    return tid, j, tl.load(offsets + tid + 1)


@triton.jit
def _unscale_and_clip(g, grad_scale, grad_coef, HAS_SCALE: tl.constexpr, HAS_COEF: tl.constexpr):
    # IEEE division (div_rn) as GradScaler's unscale in the reference; then the clipping coefficient. One place, so
    # the checked and the single-launch paths round the same way.
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale))
    if HAS_COEF:
        g = g * tl.load(grad_coef)
    return g


@triton.jit
def _sparse_adamw_step_kernel(
    param_tab,
    grad_tab,
    p_like,
    g_like,
    pivot_grads,
    blk_tid,
    blk_start,
    offsets,
    indices,
    exp_avg,
    exp_avg_sq,
    master,
    grad_scale,
    found_inf,
    grad_coef,
    nonfinite,
    numel_tab,
    decay,
    m_weight,
    beta2,
    v_weight,
    eps,
    neg_step_size,
    bias_correction2_sqrt,
    PIVOT_GRADS: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_COEF: tl.constexpr,
    SKIP_ON_FLAG: tl.constexpr,
    LERP_FROM_END: tl.constexpr,
    TILE: tl.constexpr,
):
    tid, j, end = pivot_tile(blk_tid, blk_start, offsets, TILE)
    if HAS_FOUND_INF:
        # GradScaler's protocol without a host sync: an overflowed step empties every tile, so nothing is read or
        # written. (Done on the scalar bound: the interpreter cannot AND a scalar into a block mask.)
        end = tl.where(tl.load(found_inf) == 0.0, end, 0)
    if SKIP_ON_FLAG:
        end = tl.where(tl.load(nonfinite) == 0.0, end, 0)
    mask = j < end
    idx = tl.load(indices + j, mask=mask, other=0).to(tl.int64)
    # m and v live in the packed state (always in range); θ and g only where the index is inside its tensor.
    inside = mask & (idx >= 0) & (idx < tl.load(numel_tab + tid))
    p_ptr = tl.load(param_tab + tid).to(p_like.dtype)
    if PIVOT_GRADS:
        g = tl.load(pivot_grads + j, mask=mask, other=0.0).to(tl.float32)
    else:
        g_ptr = tl.load(grad_tab + tid).to(g_like.dtype)
        g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    # IEEE division and sqrt (div_rn / sqrt_rn) where torch's AdamW uses them: Triton's `/` and `sqrt` are the
    # approximate GPU instructions, a few ulp off, which would drift from the other backends step by step.
    g = _unscale_and_clip(g, grad_scale, grad_coef, HAS_SCALE, HAS_COEF)
    if HAS_MASTER:
        theta = tl.load(master + j, mask=mask, other=0.0)
    else:
        theta = tl.load(p_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    theta = theta * decay
    m = tl.load(exp_avg + j, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq + j, mask=mask, other=0.0)
    # torch.lerp's two-sided formula (exact at both ends), as `exp_avg.lerp_(g, 1 - beta1)` computes it.
    if LERP_FROM_END:
        m = g - (g - m) * (1.0 - m_weight)
    else:
        m = m + m_weight * (g - m)
    v = v * beta2 + v_weight * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    theta = theta + neg_step_size * tl.div_rn(m, denom)
    tl.store(exp_avg + j, m, mask=mask)
    tl.store(exp_avg_sq + j, v, mask=mask)
    if HAS_MASTER:
        tl.store(master + j, theta, mask=mask)
    tl.store(p_ptr + idx, theta.to(p_ptr.dtype.element_ty), mask=inside)


@triton.jit
def load_pivot_grads(grad_tab, g_like, pivot_grads, indices, numel_tab, tid, j, mask, PIVOT_GRADS: tl.constexpr):
    """The fp32 gradients at pivots `j` of tensor `tid`: from the gathered `pivot_grads`, or from the dense gradient
    at the pivots' indices (0 where masked off or where an index lies outside the tensor)."""
    if PIVOT_GRADS:
        g = tl.load(pivot_grads + j, mask=mask, other=0.0).to(tl.float32)
    else:
        idx = tl.load(indices + j, mask=mask, other=0).to(tl.int64)
        inside = mask & (idx >= 0) & (idx < tl.load(numel_tab + tid))
        g_ptr = tl.load(grad_tab + tid).to(g_like.dtype)
        g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    return g


@triton.jit
def _gather_check_kernel(
    grad_tab,
    g_like,
    pivot_grads,
    blk_tid,
    blk_start,
    offsets,
    indices,
    numel_tab,
    out,
    grad_scale,
    found_inf,
    grad_coef,
    nonfinite,
    PIVOT_GRADS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_COEF: tl.constexpr,
    TILE: tl.constexpr,
):
    """Phase 1 of a checked step: out[j] = the pivot's gradient, unscaled and clipped (fp32); flag inf/NaN."""
    tid, j, end = pivot_tile(blk_tid, blk_start, offsets, TILE)
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf) == 0.0, end, 0)
    mask = j < end
    g = load_pivot_grads(grad_tab, g_like, pivot_grads, indices, numel_tab, tid, j, mask, PIVOT_GRADS)
    g = _unscale_and_clip(g, grad_scale, grad_coef, HAS_SCALE, HAS_COEF)
    tl.store(out + j, g, mask=mask)
    # g * 0 is 0 for every finite g and NaN for inf/NaN; a NaN never compares equal to itself.
    probe = g * 0.0
    bad = tl.sum(tl.where(mask & (probe != probe), 1, 0), axis=0)
    if bad > 0:
        tl.store(nonfinite, 1.0)


def sparse_adamw_step_triton(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    offsets: list[int],
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    pivot_grads: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    grad_coef: torch.Tensor | None,
    nonfinite: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    *,
    tile: int | None = None,
) -> None:
    """One AdamW step over the pivots, in place (params at the pivots, exp_avg, exp_avg_sq, master).

    params: T contiguous fp32 / fp16 / bf16 tensors; grads: T dense gradients shaped like them (or an empty list
    when `pivot_grads` [k] is given); offsets: T + 1 ints; indices: int32 [k] local flat indices; exp_avg,
    exp_avg_sq, master: fp32 [k] (master may be None for fp32 params); grad_scale, found_inf, grad_coef, nonfinite:
    one-element fp32 tensors or None (with `nonfinite`, two launches: gather + check, then the update). Arguments
    are the op's, already checked by `ppt_fast.sparse_adamw_step`. `tile` overrides the pivots per program (tests).
    """
    k = int(offsets[-1])
    if k == 0 or not params:
        return
    device = indices.device
    _utils.check_launchable(device)
    use_pivot_grads = pivot_grads is not None
    if not use_pivot_grads and len(grads) != len(params):
        raise ValueError(f"{len(grads)} grads for {len(params)} params; pass one per parameter, or pivot_grads")
    groups: dict[tuple[torch.dtype, torch.dtype | None], list[int]] = {}
    for i, p in enumerate(params):
        if offsets[i + 1] == offsets[i]:
            continue
        if not p.is_contiguous() or (not use_pivot_grads and not grads[i].is_contiguous()):
            raise ValueError(f"params[{i}] and grads[{i}] must be contiguous")
        _utils.dtype_code(p, f"params[{i}]")
        groups.setdefault((p.dtype, None if use_pivot_grads else grads[i].dtype), []).append(i)

    tile = _utils.check_tile(tile or (_TILE_INTERPRETER if _utils.interpreting() else _TILE_GPU))
    lengths = [offsets[i + 1] - offsets[i] for i in range(len(params))]
    param_tab = _utils.pointer_table(params, device)
    grad_tab = param_tab if use_pivot_grads else _utils.pointer_table(grads, device)
    offset_tab = _utils.int64_table(offsets, device)
    numel_tab = _utils.int64_table([p.numel() for p in params], device)
    # The host-side scalars in double, rounded once to fp32 at the launch, as torch does with Python scalars.
    m_weight = 1.0 - beta1
    scalars = (
        1.0 - lr * weight_decay,
        m_weight,
        beta2,
        1.0 - beta2,
        eps,
        -lr / (1.0 - beta1**step),
        math.sqrt(1.0 - beta2**step),
    )
    # A placeholder for absent optional tensors: never read, since the matching constexpr flag compiles the access out.
    dummy = exp_avg
    checked = nonfinite is not None
    with _utils.on_device(device):
        if checked:
            # Phase 1 over every tensor (per gradient dtype), then the update reads the fp32 scratch.
            scratch = torch.empty(k, dtype=torch.float32, device=device)
            by_grad: dict[torch.dtype | None, list[int]] = {}
            for members in groups.values():
                for i in members:
                    by_grad.setdefault(None if use_pivot_grads else grads[i].dtype, []).append(i)
            for members in by_grad.values():
                blk_tid, blk_start = _utils.block_table(lengths, members, tile, device, base=offsets[:-1])
                first = members[0]
                _gather_check_kernel[(blk_tid.numel(),)](
                    grad_tab,
                    params[first] if use_pivot_grads else grads[first],
                    pivot_grads if use_pivot_grads else dummy,
                    blk_tid,
                    blk_start,
                    offset_tab,
                    indices,
                    numel_tab,
                    scratch,
                    grad_scale if grad_scale is not None else dummy,
                    found_inf if found_inf is not None else dummy,
                    grad_coef if grad_coef is not None else dummy,
                    nonfinite,
                    PIVOT_GRADS=use_pivot_grads,
                    HAS_SCALE=grad_scale is not None,
                    HAS_FOUND_INF=found_inf is not None,
                    HAS_COEF=grad_coef is not None,
                    TILE=tile,
                    **_utils.gpu_options(num_warps=_WARPS_GPU),
                )
            groups = {}
            for i, p in enumerate(params):
                if offsets[i + 1] > offsets[i]:
                    groups.setdefault((p.dtype, None), []).append(i)
        for members in groups.values():
            blk_tid, blk_start = _utils.block_table(lengths, members, tile, device, base=offsets[:-1])
            first = members[0]
            from_scratch = checked or use_pivot_grads
            _sparse_adamw_step_kernel[(blk_tid.numel(),)](
                param_tab,
                grad_tab,
                params[first],
                params[first] if from_scratch else grads[first],
                scratch if checked else (pivot_grads if use_pivot_grads else dummy),
                blk_tid,
                blk_start,
                offset_tab,
                indices,
                exp_avg,
                exp_avg_sq,
                master if master is not None else dummy,
                grad_scale if grad_scale is not None and not checked else dummy,
                found_inf if found_inf is not None else dummy,
                grad_coef if grad_coef is not None and not checked else dummy,
                nonfinite if checked else dummy,
                numel_tab,
                *scalars,
                PIVOT_GRADS=from_scratch,
                HAS_MASTER=master is not None,
                HAS_SCALE=grad_scale is not None and not checked,
                HAS_FOUND_INF=found_inf is not None,
                HAS_COEF=grad_coef is not None and not checked,
                SKIP_ON_FLAG=checked,
                LERP_FROM_END=m_weight >= 0.5,
                TILE=tile,
                **_utils.gpu_options(num_warps=_WARPS_GPU, enable_fp_fusion=False),
            )
