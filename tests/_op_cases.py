"""Shared cases for the backend-generic op tests (tests/test_ops_*.py).

Every op test is parametrized over (backend, device): the CPU backends that `ppt_fast._backend` reports available
here (`ref`, and `cpp` when the extension is built), plus `cuda` / `triton` / `ref` on a CUDA device, marked `cuda`
so they skip cleanly without a GPU. Triton under TRITON_INTERPRET=1 is left to the `interpreter` lane (tiny shapes):
the shapes here would take it minutes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from ppt_fast import _backend

CPU = torch.device("cpu")

# MusicGen-small (d = 1024) weight shapes: attention in-projection, FFN up and down.
REALISTIC_SHAPES = [(3072, 1024), (4096, 1024), (1024, 4096)]
# One element, primes, a size that is not a multiple of any block (278011 = 11 * 127 * 199), one past a power of
# two (so a 2^16 chunk has a 1-element tail), a 3-D tensor.
AWKWARD_SHAPES = [(1,), (7,), (13, 17), (278011,), (65537,), (3, 5, 7)]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend_params(op: str) -> list:
    """pytest params `(backend, device)` for `op`: available CPU backends, and GPU backends marked `cuda`."""
    cpu = [b for b in _backend.available_backends(op, CPU) if b != "triton"]
    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in cpu]
    params += [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.cuda) for b in ("cuda", "triton", "ref")]
    return params


@contextlib.contextmanager
def use_backend(op: str, backend: str, device: str) -> Iterator[torch.device]:
    """Force `backend` inside the block (skip the test when it cannot run here); yields the torch device."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = _backend.why_unavailable(op, backend, dev)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op} on {dev}: {reason}")
    with _backend.force(backend):
        yield dev


def randn(shape, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """Fresh N(0, scale²) values drawn in fp32 on CPU (so every device sees the same numbers), cast, moved."""
    return (torch.randn(shape) * scale).to(dtype).to(device)


def strided_view(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A non-contiguous view of `shape` (every other column of a wider tensor), filled with fresh randoms."""
    *lead, last = shape if len(shape) else (1,)
    wide = randn((*lead, 2 * last), dtype, device)
    view = wide[..., ::2]
    assert not view.is_contiguous() or view.numel() <= 1
    return view
