"""Argument checks the ops share. Every error names the argument and says how to fix it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_tensor_list(value, arg: str) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be a list of tensors, got a single tensor; wrap it: [{arg}]")
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{arg} must be a list of tensors, got {type(value).__name__}") from None
    for i, t in enumerate(items):
        if t is None:
            raise ValueError(f"{arg}[{i}] is None (a parameter that got no gradient?); leave it out of the lists")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}[{i}] is a {type(t).__name__}, not a tensor")
    return items


def check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(
            f"{name_a} has {len(a)} tensors but {name_b} has {len(b)}; pass one per tensor, in the same order"
        )


def check_pairwise(ref: Sequence[torch.Tensor], other: Sequence[torch.Tensor], name_ref: str, name_other: str) -> None:
    """Same shapes and devices, element by element."""
    for i, (r, o) in enumerate(zip(ref, other)):
        if r.shape != o.shape:
            raise ValueError(
                f"{name_other}[{i}] has shape {tuple(o.shape)} but {name_ref}[{i}] has {tuple(r.shape)}; "
                "the lists must pair up tensor by tensor"
            )
        if r.device != o.device:
            raise ValueError(
                f"{name_other}[{i}] is on {o.device} but {name_ref}[{i}] is on {r.device}; move them to one device"
            )


def common_device(tensors: Sequence[torch.Tensor], arg: str) -> torch.device:
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(
                f"{arg}[{i}] is on {t.device} but {arg}[0] is on {device}; every tensor must be on one device"
            )
    return device


def check_dtypes(tensors: Sequence[torch.Tensor], arg: str, allowed: Sequence[torch.dtype]) -> None:
    for i, t in enumerate(tensors):
        if t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{arg}[{i}] has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")


def check_contiguous(tensors: Sequence[torch.Tensor], arg: str, why: str) -> None:
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(
                f"{arg}[{i}] is not contiguous ({why}); pass {arg}[{i}].contiguous() or allocate it contiguous"
            )


def contiguous_all(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Read-only inputs may be strided views: copy those (once) so kernels see flat row-major memory."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def check_pivot_indices(tensors: Sequence[torch.Tensor], offsets: Sequence[int], indices: torch.Tensor) -> None:
    """Refuse pivot indices that are not valid for `tensors` (PivotError), unless these very indices were checked
    against the same offsets and sizes before (a PivotSet's are checked when it is made): no kernel may be handed an
    index outside its tensor."""
    from ..pivots import ensure_checked

    def names() -> list[str]:
        return [f"params[{i}]" for i in range(len(tensors))]

    ensure_checked(names, [t.numel() for t in tensors], offsets, indices, "pivot indices")
