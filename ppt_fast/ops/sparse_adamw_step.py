"""sparse_adamw_step: one AdamW step over the pivots of many tensors, in one launch, with state only for pivots.

Contract (k = number of pivots; pivot j belongs to tensor i when offsets[i] <= j < offsets[i + 1])
- `params`: the whole parameter tensors (fp32 / fp16 / bf16, contiguous), updated in place at the pivots only;
  every non-pivot entry stays bitwise unchanged.
- The gradient at pivot j is `grads[i].view(-1)[indices[j]]` (dense grads), or `pivot_grads[j]` when the caller
  gathered them already (e.g. in backward hooks); exactly one of the two.
- `exp_avg`, `exp_avg_sq`: fp32 `[k]`. `master`: fp32 `[k]` or None. When given, master holds the authoritative
  fp32 value of every pivot: the update reads and writes master and stores `master.to(param.dtype)` into the
  parameter. It is required when any parameter is fp16/bf16.
- `grad_scale` (fp32 scalar tensor): gradients are divided by it first (GradScaler's unscale, fused).
  `found_inf` (fp32 scalar tensor): when non-zero the whole step is skipped, nothing is written — the same
  protocol as torch's fused AdamW under GradScaler.
- `grad_coef` (fp32 scalar tensor): gradients are then multiplied by it (a clipping coefficient computed on the
  device, so clipping needs neither a host sync nor a pass over the dense gradients).
- `nonfinite` (fp32 scalar tensor, written): when given, the step is checked: if any pivot gradient (after the
  scale and the coefficient) is inf/NaN, `nonfinite` is set to 1 and every param, m, v and master is left bitwise as
  it was. (`cpp` either runs the one pass speculatively, keeping a backup of the old values it overwrites and
  putting them back in the rare bad step, or checks first, by density; `triton` / `cuda` gather and check in one
  launch and update in a second that reads the flag on the device, so on a GPU the caller learns of a skipped step
  only when it reads the flag.)
- Pivot indices must lie in [0, numel) and strictly increase per tensor. They are checked once (a PivotSet's
  indices carry the mark of their check; any other index tensor is checked here on its first use, and again after
  any in-place change), and no backend ever reads or writes outside a parameter, whatever the indices.
- Math per pivot, in fp32, with `step` the 1-based step count (same order of operations as torch.optim.AdamW):
      g = grad / grad_scale · grad_coef
      θ = θ · (1 − lr·wd)                    (decoupled weight decay, pivots only)
      m = m + (1 − β1)·(g − m)
      v = β2·v + (1 − β2)·g²
      θ = θ − (lr / (1 − β1^step)) · m / (sqrt(v) / sqrt(1 − β2^step) + eps)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _backend
from . import _checks

PARAM_DTYPES = _checks.FLOAT_DTYPES
# csrc/cpu/sparse_adamw_step.cpp's kCheckFirstDensityInverse: a checked step checks first when k >= N / this.
CHECK_FIRST_DENSITY_INVERSE = 40
_OP = "sparse_adamw_step"
_ORDER_CUDA = ("cuda", "triton", "ref")


def _sparse_adamw_step_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    offsets: Sequence[int],
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
) -> None:
    """The contract in plain PyTorch: gather every gradient, check them, then update the state slices and scatter
    (one tensor at a time)."""
    if found_inf is not None and float(found_inf.item()) != 0.0:
        return
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = lr / bias_correction1
    gathered = []
    for i in range(len(params)):
        lo, hi = offsets[i], offsets[i + 1]
        if lo == hi:
            gathered.append(None)
            continue
        idx = indices[lo:hi].long()
        g = (pivot_grads[lo:hi] if pivot_grads is not None else grads[i].reshape(-1)[idx]).float()
        if grad_scale is not None:
            g = g / grad_scale.float()
        if grad_coef is not None:
            g = g * grad_coef.float()
        gathered.append(g)
    if nonfinite is not None and any(g is not None and not bool(torch.isfinite(g).all()) for g in gathered):
        nonfinite.fill_(1.0)
        return
    for i, p in enumerate(params):
        lo, hi = offsets[i], offsets[i + 1]
        if lo == hi:
            continue
        idx = indices[lo:hi].long()
        flat = p.view(-1)
        g = gathered[i]
        theta = master[lo:hi].clone() if master is not None else flat[idx].float()
        theta.mul_(1.0 - lr * weight_decay)
        m, v = exp_avg[lo:hi], exp_avg_sq[lo:hi]
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        theta.addcdiv_(m, denom, value=-step_size)
        if master is not None:
            master[lo:hi] = theta
        flat[idx] = theta.to(p.dtype)


def checked_workspace_numel(k: int, total: int, dense: bool) -> int:
    """fp32 entries of the scratch a checked `cpp` step uses (a caller that steps often keeps one and passes it to
    `_run`, since fresh memory costs a page fault per 4 KiB): the speculative pass's backup of m, v and θ (3k) for
    sparse pivots with dense gradients, else the check-first scratch (k)."""
    return 3 * k if dense and k * CHECK_FIRST_DENSITY_INVERSE < total else k


def _run(
    params,
    grads,
    offsets,
    indices,
    exp_avg,
    exp_avg_sq,
    master,
    pivot_grads,
    grad_scale,
    found_inf,
    grad_coef,
    nonfinite,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    workspace=None,
) -> None:
    _checks.check_pivot_indices(params, offsets, indices)
    device = indices.device
    backend = _backend.select(_OP, device, _ORDER_CUDA if device.type == "cuda" else None)
    args = (
        params,
        grads,
        offsets,
        indices,
        exp_avg,
        exp_avg_sq,
        master,
        pivot_grads,
        grad_scale,
        found_inf,
        grad_coef,
        nonfinite,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
    )
    if backend == "ref":
        _sparse_adamw_step_ref(*args)
    elif backend == "cpp":
        torch.ops.ppt_fast._sparse_adamw_step_cpp(*args, workspace)
    elif backend == "cuda":
        torch.ops.ppt_fast._sparse_adamw_step_cuda(*args)
    else:
        from ..kernels.triton.sparse_adamw_step import sparse_adamw_step_triton

        sparse_adamw_step_triton(*args)


@torch.library.custom_op(
    "ppt_fast::sparse_adamw_step", mutates_args=("params", "exp_avg", "exp_avg_sq", "master", "nonfinite")
)
def _sparse_adamw_step_op(
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
) -> None:
    """Tensor-level op (checked by `torch.library.opcheck`); `grads` is an empty list when `pivot_grads` is given."""
    _run(
        params,
        grads,
        offsets,
        indices,
        exp_avg,
        exp_avg_sq,
        master,
        pivot_grads,
        grad_scale,
        found_inf,
        grad_coef,
        nonfinite,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
    )


@_sparse_adamw_step_op.register_fake
def _(
    params,
    grads,
    offsets,
    indices,
    exp_avg,
    exp_avg_sq,
    master,
    pivot_grads,
    grad_scale,
    found_inf,
    grad_coef,
    nonfinite,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
) -> None:
    return None


def _check_scalar(t: torch.Tensor | None, arg: str, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{arg} must be a one-element float32 tensor (as torch.amp.GradScaler makes), got {t!r}")
    if t.device != device:
        raise ValueError(f"{arg} is on {t.device} but the pivots are on {device}; move it to {device}")


def sparse_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor] | None,
    offsets: Sequence[int] | torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None = None,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    pivot_grads: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    grad_coef: torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
) -> None:
    """One AdamW step over the pivots (see the module docstring for the exact math).

    Args:
        params: T parameter tensors (fp32/fp16/bf16, contiguous), updated in place at the pivots.
        grads: T dense gradients shaped like params, or None when `pivot_grads` is given.
        offsets: T + 1 int64 offsets (a PivotSet's `offsets`); `indices`: int32 `[k]` packed local indices.
        exp_avg, exp_avg_sq: fp32 `[k]` Adam moments (updated in place). master: fp32 `[k]` or None.
        step: the 1-based step number used for bias correction. lr, beta1, beta2, eps, weight_decay: AdamW's.
        pivot_grads: fp32/fp16/bf16 `[k]` gradients already gathered at the pivots.
        grad_scale, found_inf: one-element fp32 tensors, the GradScaler protocol (unscale; skip when found_inf != 0).
        grad_coef: one-element fp32 tensor multiplying the (unscaled) gradients, e.g. a clipping coefficient.
        nonfinite: one-element fp32 tensor; when given, a NaN/inf gradient anywhere sets it to 1 and leaves the
            step undone (every param, m, v and master bitwise unchanged).

    Raises `ppt_fast.PivotError` when `indices` are not valid pivots of `params` (out of range, unsorted, repeated).
    """
    params = _checks.as_tensor_list(params, "params")
    offsets = [int(o) for o in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]
    if len(offsets) != len(params) + 1:
        raise ValueError(f"offsets has {len(offsets)} entries; expected len(params) + 1 = {len(params) + 1}")
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError("offsets must start at 0 and never decrease (use a PivotSet's offsets)")
    k = offsets[-1]
    if (
        not isinstance(indices, torch.Tensor)
        or indices.dtype != torch.int32
        or indices.dim() != 1
        or indices.numel() != k
    ):
        raise ValueError(
            f"indices must be int32 of shape [{k}] (offsets[-1]); got {getattr(indices, 'dtype', None)} "
            f"{tuple(getattr(indices, 'shape', ()))}"
        )
    if (grads is None) == (pivot_grads is None):
        raise ValueError("give exactly one of grads= (dense gradients) or pivot_grads= (gradients gathered at pivots)")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the 1-based step count for bias correction), got {step!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value} must be a finite number >= 0")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(
            f"eps={eps} must be a finite number > 0: it keeps m / (sqrt(v) + eps) finite where a pivot's gradient "
            "has been zero (eps=0 turns those pivots into NaN); AdamW's default is 1e-8"
        )
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value} must lie in [0, 1)")
    if not params:
        return
    device = _checks.common_device(params, "params")
    if indices.device != device:
        raise ValueError(
            f"indices are on {indices.device} but params on {device}; move the PivotSet with .to({device})"
        )
    _checks.check_dtypes(params, "params", PARAM_DTYPES)
    _checks.check_contiguous(params, "params", "they are updated in place")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("master", master)):
        if t is None:
            continue
        if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != k or t.device != device or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous float32 [{k}] tensor on {device}; got {t.dtype} "
                f"{tuple(t.shape)} on {t.device}"
            )
    if master is None:
        low = [i for i, p in enumerate(params) if p.dtype != torch.float32 and offsets[i + 1] > offsets[i]]
        if low:
            raise ValueError(
                f"params {low} are {params[low[0]].dtype} and need an fp32 master copy of their pivots: "
                "pass master= (fp32 [k], initialised from the parameters at the pivots)"
            )
    grad_list: list[torch.Tensor] = []
    if grads is not None:
        grad_list = _checks.as_tensor_list(grads, "grads")
        _checks.check_same_length(params, grad_list, "params", "grads")
        _checks.check_pairwise(params, grad_list, "params", "grads")
        _checks.check_dtypes(grad_list, "grads", PARAM_DTYPES)
        grad_list = _checks.contiguous_all(grad_list)
    else:
        if pivot_grads.dim() != 1 or pivot_grads.numel() != k or pivot_grads.device != device:
            raise ValueError(
                f"pivot_grads must be a [{k}] tensor on {device}, got {tuple(pivot_grads.shape)} on "
                f"{pivot_grads.device}"
            )
        if pivot_grads.dtype not in PARAM_DTYPES:
            raise TypeError(f"pivot_grads has dtype {pivot_grads.dtype}; use float32, float16 or bfloat16")
        pivot_grads = pivot_grads.contiguous()
    _check_scalar(grad_scale, "grad_scale", device)
    _check_scalar(found_inf, "found_inf", device)
    _check_scalar(grad_coef, "grad_coef", device)
    _check_scalar(nonfinite, "nonfinite", device)
    if k == 0:
        return
    torch.ops.ppt_fast.sparse_adamw_step(
        params,
        grad_list,
        offsets,
        indices,
        exp_avg,
        exp_avg_sq,
        master,
        pivot_grads,
        grad_scale,
        found_inf,
        grad_coef,
        nonfinite,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        int(step),
    )
