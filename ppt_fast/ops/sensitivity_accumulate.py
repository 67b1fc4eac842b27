"""sensitivity_accumulate: `scores[i] += f(grads[i], params[i])`, in place, over lists of tensors, in one launch.

Contract
- `scores`: list of fp32 or bf16 tensors, contiguous (updated in place).
- `grads`: list of fp32 / fp16 / bf16 tensors, one per score and of the same shape (strided views are copied).
- `params`: list like `grads`, required by `taylor` only.
- Every tensor on one device. The update is computed in fp32 and rounded once into the score's dtype:
  `scores[i] = dtype(float(scores[i]) + f(float(g), float(p)))`.
- Modes (`f`): `grad_sq` g² (diagonal Fisher), `grad_abs` |g|, `taylor` |g·θ| (first-order Taylor saliency),
  `sgd_delta` g (signed: the buffer holds Σg; the score is its magnitude |Σg|, the change plain SGD would make —
  `select_pivots` ranks by magnitude, so the buffer goes in as it is).
Backends: `ref` (below), `cpp` (`ppt_fast::_sensitivity_accumulate_cpp`), `cuda` (`..._cuda`),
`triton` (`ppt_fast.kernels.triton.sensitivity_accumulate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from . import _checks

MODES: dict[str, int] = {"grad_sq": 0, "grad_abs": 1, "taylor": 2, "sgd_delta": 3}
SCORE_DTYPES = (torch.float32, torch.bfloat16)
GRAD_DTYPES = _checks.FLOAT_DTYPES
_OP = "sensitivity_accumulate"
_ORDER_CUDA = ("triton", "cuda", "ref")


def _sensitivity_accumulate_ref(
    scores: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None, mode: str
) -> None:
    """The contract in plain PyTorch (a Python loop over tensors; fp32 math, one rounding into the score dtype)."""
    for i, (s, g) in enumerate(zip(scores, grads)):
        g32 = g.float()
        if mode == "grad_sq":
            upd = g32 * g32
        elif mode == "grad_abs":
            upd = g32.abs()
        elif mode == "taylor":
            upd = (g32 * params[i].float()).abs()
        else:  # sgd_delta
            upd = g32
        if s.dtype == torch.float32:
            s.add_(upd)
        else:
            s.copy_(s.float().add_(upd))


def _run(scores: list[torch.Tensor], grads: list[torch.Tensor], params: list[torch.Tensor] | None, mode: str) -> None:
    if not scores:
        return
    device = scores[0].device
    backend = _backend.select(_OP, device, _ORDER_CUDA if device.type == "cuda" else None)
    if backend == "ref":
        _sensitivity_accumulate_ref(scores, grads, params, mode)
    elif backend == "cpp":
        torch.ops.ppt_fast._sensitivity_accumulate_cpp(scores, grads, params or [], MODES[mode])
    elif backend == "cuda":
        torch.ops.ppt_fast._sensitivity_accumulate_cuda(scores, grads, params or [], MODES[mode])
    else:
        from ..kernels.triton.sensitivity_accumulate import sensitivity_accumulate_triton

        sensitivity_accumulate_triton(scores, grads, params, MODES[mode])


@torch.library.custom_op("ppt_fast::sensitivity_accumulate", mutates_args=("scores",))
def _sensitivity_accumulate_op(
    scores: list[torch.Tensor], grads: list[torch.Tensor], params: list[torch.Tensor], score_mode: str
) -> None:
    """Tensor-level op (checked by `torch.library.opcheck`); `params` is an empty list when not needed.
    (`score_mode`, not `mode`: torch's functionalization passes a `mode` keyword of its own.)"""
    _run(scores, grads, params if params else None, score_mode)


@_sensitivity_accumulate_op.register_fake
def _(scores, grads, params, score_mode) -> None:
    return None


def sensitivity_accumulate(
    scores: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    params: Sequence[torch.Tensor] | None = None,
    mode: str = "grad_sq",
) -> None:
    """Accumulate per-entry sensitivity scores in place: `scores[i] += f(grads[i], params[i])` for every i.

    Args:
        scores: fp32 or bf16 tensors, contiguous; updated in place (accumulation is done in fp32).
        grads: fp32 / fp16 / bf16 tensors shaped like `scores` (one per score, same order, same device).
        params: the parameter values, shaped like `scores`; needed by `mode="taylor"` only.
        mode: `grad_sq` (Σg², default), `grad_abs` (Σ|g|), `taylor` (Σ|g·θ|) or `sgd_delta` (signed Σg).

    All tensors are handled by one kernel launch on the selected backend (see `ppt_fast._backend`).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    scores = _checks.as_tensor_list(scores, "scores")
    grads = _checks.as_tensor_list(grads, "grads")
    _checks.check_same_length(scores, grads, "scores", "grads")
    if mode == "taylor" and params is None:
        raise ValueError("mode='taylor' scores |g·θ| and needs params=[...] (the parameter tensors, in the same order)")
    plist = None
    if params is not None:
        plist = _checks.as_tensor_list(params, "params")
        _checks.check_same_length(scores, plist, "scores", "params")
    if not scores:
        return
    _checks.common_device(scores, "scores")
    _checks.check_pairwise(scores, grads, "scores", "grads")
    _checks.check_dtypes(scores, "scores", SCORE_DTYPES)
    _checks.check_dtypes(grads, "grads", GRAD_DTYPES)
    _checks.check_contiguous(scores, "scores", "scores are updated in place")
    grads = _checks.contiguous_all(grads)
    if plist is not None:
        _checks.check_pairwise(scores, plist, "scores", "params")
        _checks.check_dtypes(plist, "params", GRAD_DTYPES)
        plist = _checks.contiguous_all(plist) if mode == "taylor" else None
    torch.ops.ppt_fast.sensitivity_accumulate(scores, grads, plist or [], mode)
