"""pivot_grad_norm: the norm of the gradients at the pivots of many tensors, in one launch (what clipping needs).

Contract (k pivots; pivot j belongs to tensor i when offsets[i] <= j < offsets[i + 1])
- The gradient at pivot j is `grads[i].view(-1)[indices[j]]` (dense gradients), or `pivot_grads[j]` when they are
  already gathered; exactly one of the two. fp32 / fp16 / bf16.
- Returns a 0-d fp32 tensor on the gradients' device: `torch.linalg.vector_norm` of the k gradients (as fp32) with
  `ord=norm_type` (> 0, or inf). A NaN gradient makes it NaN and an inf one (with no NaN) inf, for every norm type,
  so `isfinite(norm)` is exactly "every pivot gradient is finite".
- Accumulation: `cpp` sums in double and combines chunk partials in a fixed order (deterministic); `triton` sums
  fp32 tile partials, then the partials in fp32 (deterministic, |error| ≤ what torch's own fp32 reduction makes).
- Indices must be valid pivots (checked as `sparse_adamw_step` checks them); nothing is written.
Backends: `ref` (below), `cpp` (`ppt_fast::_pivot_grad_norm_cpp`), `triton`
(`ppt_fast.kernels.triton.pivot_grad_norm`); on CUDA the order is triton, then ref, and a forced `cuda` backend
runs the Triton kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _backend
from . import _checks

_OP = "pivot_grad_norm"
_ORDER_CUDA = ("triton", "ref")
# A reduction this small needs no CUDA C++ kernel of its own: with the cuda backend forced, Triton's runs.
_STAND_IN = {"cuda": "triton"}


def _pivot_grad_norm_ref(
    grads: Sequence[torch.Tensor],
    offsets: Sequence[int],
    indices: torch.Tensor,
    pivot_grads: torch.Tensor | None,
    norm_type: float,
) -> torch.Tensor:
    """The contract in plain PyTorch: gather per tensor, then one vector_norm (fp64 accumulation, as `cpp`)."""
    if pivot_grads is not None:
        g = pivot_grads.float()
    else:
        parts = [
            grads[i].reshape(-1)[indices[offsets[i] : offsets[i + 1]].long()].float()
            for i in range(len(offsets) - 1)
            if offsets[i + 1] > offsets[i]
        ]
        g = torch.cat(parts) if parts else torch.zeros(0, device=indices.device)
    g = g.double()
    if bool(torch.isnan(g).any()):
        return torch.tensor(float("nan"), device=indices.device)
    return torch.linalg.vector_norm(g, norm_type).float()


def _run(grads, offsets, indices, pivot_grads, norm_type) -> torch.Tensor:
    if pivot_grads is None:
        _checks.check_pivot_indices(grads, offsets, indices)
    device = indices.device
    backend = _backend.select(_OP, device, _ORDER_CUDA if device.type == "cuda" else None, stand_in=_STAND_IN)
    if backend == "ref":
        return _pivot_grad_norm_ref(grads, offsets, indices, pivot_grads, norm_type)
    if backend == "cpp":
        return torch.ops.ppt_fast._pivot_grad_norm_cpp(grads, offsets, indices, pivot_grads, norm_type)
    if backend == "triton":
        from ..kernels.triton.pivot_grad_norm import pivot_grad_norm_triton

        return pivot_grad_norm_triton(grads, offsets, indices, pivot_grads, norm_type)
    raise _backend.BackendUnavailable(f"{_OP}: backend {backend!r} has no kernel for this op; use cpp, triton or ref")


@torch.library.custom_op("ppt_fast::pivot_grad_norm", mutates_args=())
def _pivot_grad_norm_op(
    grads: list[torch.Tensor],
    offsets: list[int],
    indices: torch.Tensor,
    pivot_grads: torch.Tensor | None,
    norm_type: float,
) -> torch.Tensor:
    """Tensor-level op (checked by `torch.library.opcheck`); `grads` is an empty list when `pivot_grads` is given."""
    return _run(grads, offsets, indices, pivot_grads, norm_type)


@_pivot_grad_norm_op.register_fake
def _(grads, offsets, indices, pivot_grads, norm_type) -> torch.Tensor:
    return indices.new_empty((), dtype=torch.float32)


def pivot_grad_norm(
    grads: Sequence[torch.Tensor] | None,
    offsets: Sequence[int] | torch.Tensor,
    indices: torch.Tensor,
    *,
    pivot_grads: torch.Tensor | None = None,
    norm_type: float = 2.0,
) -> torch.Tensor:
    """The `norm_type` norm of the gradients at the pivots (0-d fp32 tensor; no host sync on a GPU).

    Args:
        grads: T dense gradients (fp32 / fp16 / bf16), or None when `pivot_grads` is given.
        offsets: T + 1 ints (a PivotSet's `offsets`); indices: int32 `[k]` packed local indices.
        pivot_grads: `[k]` gradients already gathered at the pivots.
        norm_type: > 0, or `inf` (max |g|).
    """
    offsets = [int(o) for o in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]
    if not isinstance(norm_type, (int, float)) or isinstance(norm_type, bool) or not norm_type > 0:
        raise ValueError(f"norm_type={norm_type!r} must be a number > 0 or math.inf")
    if (grads is None) == (pivot_grads is None):
        raise ValueError("give exactly one of grads= (dense gradients) or pivot_grads= (gradients gathered at pivots)")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 1:
        raise ValueError(f"indices must be a 1-D int32 tensor, got {getattr(indices, 'dtype', type(indices))}")
    if not offsets or offsets[0] != 0 or offsets[-1] != indices.numel():
        raise ValueError(f"offsets must start at 0 and end at len(indices) = {indices.numel()}")
    grad_list: list[torch.Tensor] = []
    if grads is not None:
        grad_list = _checks.as_tensor_list(grads, "grads")
        if len(grad_list) != len(offsets) - 1:
            raise ValueError(f"{len(grad_list)} grads for {len(offsets) - 1} tensors; pass one per tensor")
        if grad_list:
            device = _checks.common_device(grad_list, "grads")
            if device != indices.device:
                raise ValueError(f"indices are on {indices.device} but grads on {device}; move the PivotSet")
        _checks.check_dtypes(grad_list, "grads", _checks.FLOAT_DTYPES)
        grad_list = _checks.contiguous_all(grad_list)
    else:
        if pivot_grads.dim() != 1 or pivot_grads.numel() != indices.numel() or pivot_grads.device != indices.device:
            raise ValueError(f"pivot_grads must be a [{indices.numel()}] tensor on {indices.device}")
        if pivot_grads.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"pivot_grads has dtype {pivot_grads.dtype}; use float32, float16 or bfloat16")
        pivot_grads = pivot_grads.contiguous()
    norm_type = float(norm_type)
    if math.isinf(norm_type):
        norm_type = math.inf
    return torch.ops.ppt_fast.pivot_grad_norm(grad_list, offsets, indices, pivot_grads, norm_type)
