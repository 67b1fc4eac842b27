"""Triton kernel + launcher for `sensitivity_accumulate`: `scores[i] += f(grads[i], params[i])` for all i, one launch.

See `ppt_fast.ops.sensitivity_accumulate` for the contract. Tensors are reached through pointer tables and tiled by a
block table (see `_utils`); one launch per (score, grad, param) dtype combination, normally exactly one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils

MODE_GRAD_SQ, MODE_GRAD_ABS, MODE_TAYLOR, MODE_SGD_DELTA = 0, 1, 2, 3

# 4096 fp32 = 16 KB of gradient per program with 8 warps: 16 entries per thread, four 128-bit loads in flight per
# operand, enough bytes in flight per SM to saturate HBM. The interpreter pays ~1.6 ms per program whatever its size,
# so it gets big tiles too, but small enough that test tensors of a few thousand entries span several tiles.
_TILE_GPU = 4096
_WARPS_GPU = 8
_TILE_INTERPRETER = 512


@triton.jit
def _accumulate_tile(
    s_ptr,
    g_ptr,
    p_ptr,
    offs,
    n,
    MODE: tl.constexpr,
    MASKED: tl.constexpr,
):
    # Full tiles load without a mask so the compiler can use 128-bit accesses (a per-entry mask against a runtime
    # length would force scalar ones); only a tensor's last tile pays for the mask.
    if MASKED:
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs).to(tl.float32)
        s = tl.load(s_ptr + offs).to(tl.float32)
    # Everything upcast to fp32 right after the load: one rounding into the score's dtype at the end (the contract),
    # and the interpreter's 16-bit arithmetic is not IEEE.
    if MODE == 0:
        upd = g * g
    elif MODE == 1:
        upd = tl.abs(g)
    elif MODE == 2:
        if MASKED:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            p = tl.load(p_ptr + offs).to(tl.float32)
        upd = tl.abs(g * p)
    else:
        upd = g
    # No FMA contraction (launched with enable_fp_fusion=False): g² is rounded before the add, as the reference
    # does, so fp32 scores match it bitwise.
    out = (s + upd).to(s_ptr.dtype.element_ty)
    if MASKED:
        tl.store(s_ptr + offs, out, mask=mask)
    else:
        tl.store(s_ptr + offs, out)


@triton.jit
def _sensitivity_accumulate_kernel(
    score_tab,
    grad_tab,
    param_tab,
    blk_tid,
    blk_start,
    numels,
    s_like,
    g_like,
    p_like,
    MODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(blk_tid + pid)
    # int64 offsets: a tensor may pass 2**31 entries (the pointer arithmetic below would wrap in int32).
    start = tl.multiple_of(tl.load(blk_start + pid), TILE)
    n = tl.load(numels + tid)
    # Table entries are plain int64 addresses; a tensor of the group's dtype lends them its pointer type.
    s_ptr = tl.load(score_tab + tid).to(s_like.dtype)
    g_ptr = tl.load(grad_tab + tid).to(g_like.dtype)
    p_ptr = tl.load(param_tab + tid).to(p_like.dtype)
    if ALIGNED:
        # Pointers read from a table carry no alignment facts; the launcher checked every base is 16-byte aligned.
        s_ptr = tl.multiple_of(s_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
    offs = start + tl.arange(0, TILE).to(tl.int64)
    if start + TILE <= n:
        _accumulate_tile(s_ptr, g_ptr, p_ptr, offs, n, MODE, False)
    else:
        _accumulate_tile(s_ptr, g_ptr, p_ptr, offs, n, MODE, True)


def sensitivity_accumulate_triton(
    scores: list[torch.Tensor],
    grads: list[torch.Tensor],
    params: list[torch.Tensor] | None,
    mode: int,
    *,
    tile: int | None = None,
) -> None:
    """`scores[i] += f(grads[i], params[i])` in place (mode 0 g², 1 |g|, 2 |g·θ|, 3 g), fp32 math, one rounding.

    scores: fp32 / bf16, contiguous; grads, params: fp32 / fp16 / bf16, contiguous, shaped like the scores; every
    tensor on one device (CUDA, or CPU under TRITON_INTERPRET=1). `tile` overrides the entries per program (tests).
    """
    if not scores:
        return
    if mode not in (MODE_GRAD_SQ, MODE_GRAD_ABS, MODE_TAYLOR, MODE_SGD_DELTA):
        raise ValueError(f"mode={mode} is not 0 (grad_sq), 1 (grad_abs), 2 (taylor) or 3 (sgd_delta)")
    if mode == MODE_TAYLOR and not params:
        raise ValueError("mode 2 (taylor) needs params, one per score")
    device = scores[0].device
    _utils.check_launchable(device)
    use_params = mode == MODE_TAYLOR
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (s, g) in enumerate(zip(scores, grads, strict=True)):
        if not (s.is_contiguous() and g.is_contiguous() and (not use_params or params[i].is_contiguous())):
            raise ValueError(f"tensor {i}: scores, grads and params must be contiguous (pass .contiguous() copies)")
        if s.numel() == 0:
            continue
        if s.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"scores[{i}] has dtype {s.dtype}; scores are float32 or bfloat16")
        key = (
            _utils.dtype_code(s, f"scores[{i}]"),
            _utils.dtype_code(g, f"grads[{i}]"),
            _utils.dtype_code(params[i], f"params[{i}]") if use_params else _utils.FP32,
        )
        groups.setdefault(key, []).append(i)
    if not groups:
        return
    tile = _utils.check_tile(tile or (_TILE_INTERPRETER if _utils.interpreting() else _TILE_GPU))
    numels = [s.numel() for s in scores]
    score_tab = _utils.pointer_table(scores, device)
    grad_tab = _utils.pointer_table(grads, device)
    # Without taylor the param table is never read; any valid table keeps the signature fixed.
    param_tab = _utils.pointer_table(params, device) if use_params else grad_tab
    numel_tab = _utils.int64_table(numels, device)
    with _utils.on_device(device):
        for members in groups.values():
            blk_tid, blk_start = _utils.block_table(numels, members, tile, device)
            first = members[0]
            group = [scores[i] for i in members] + [grads[i] for i in members]
            if use_params:
                group += [params[i] for i in members]
            _sensitivity_accumulate_kernel[(blk_tid.numel(),)](
                score_tab,
                grad_tab,
                param_tab,
                blk_tid,
                blk_start,
                numel_tab,
                scores[first],
                grads[first],
                params[first] if use_params else grads[first],
                MODE=mode,
                ALIGNED=_utils.aligned(group),
                TILE=tile,
                **_utils.gpu_options(num_warps=_WARPS_GPU, enable_fp_fusion=False),
            )
