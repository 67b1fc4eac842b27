"""The one backend selector: which implementation (ref | cpp | cuda | triton) runs an op on a device.

Order of precedence: a `force()` context (tests, benchmarks) > `PPT_FAST_BACKEND` > the op's own preference list,
first available wins. Every decision is logged at DEBUG with the reasons the others were passed over.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Iterator, Mapping, Sequence

import torch

from . import _env, _ext

log = logging.getLogger(__name__)

# Preference when nothing is forced: compiled C++ on CPU; on CUDA the op file gives its own order.
CPU_ORDER = ("cpp", "ref")
CUDA_ORDER = ("cuda", "triton", "ref")

_forced: list[str] = []


class BackendUnavailable(RuntimeError):
    """A backend was asked for explicitly but cannot run here; the message says why and how to fix it."""


@contextlib.contextmanager
def force(backend: str) -> Iterator[None]:
    """Run every op inside the block with `backend` (raises BackendUnavailable where it cannot run)."""
    if backend not in _env.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {_env.BACKENDS}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """None when `backend` can run `op` on `device`, else a sentence saying why not."""
    if backend == "ref":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, these are on {device}"
        if not _ext.has_op(f"_{op}_cpp"):
            return _ext.load_error() or f"ppt_fast._C has no _{op}_cpp (rebuild the extension)"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        if not _ext.has_op(f"_{op}_cuda"):
            return _ext.load_error() or (
                f"ppt_fast._C was built without CUDA kernels (no _{op}_cuda): build it where torch is a CUDA build "
                "and CUDA_HOME points at a toolkit"
            )
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _env.triton_interpret():
            return None
        return f"triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); these are on {device}"
    return f"unknown backend {backend!r}"


def select(
    op: str, device: torch.device, order: Sequence[str] | None = None, stand_in: Mapping[str, str] | None = None
) -> str:
    """Pick the backend for `op` on `device`. `stand_in` maps a backend the op has no kernel for to the one that runs
    in its place when that backend is forced (e.g. an op with no CUDA C++ kernel runs its Triton one)."""
    wanted = _forced[-1] if _forced else _env.backend_override()
    if wanted is not None and stand_in and wanted in stand_in:
        log.debug("%s: %s requested, %s runs in its place (no %s kernel)", op, wanted, stand_in[wanted], wanted)
        wanted = stand_in[wanted]
    if wanted is not None:
        reason = why_unavailable(op, wanted, device)
        if reason is not None:
            source = "force()" if _forced else "PPT_FAST_BACKEND"
            raise BackendUnavailable(f"{op}: backend {wanted!r} (from {source}) cannot run: {reason}")
        return wanted
    if order is None:
        order = CUDA_ORDER if device.type == "cuda" else CPU_ORDER
    skipped = []
    for backend in order:
        reason = why_unavailable(op, backend, device)
        if reason is None:
            if skipped:
                log.debug("%s on %s: %s (skipped %s)", op, device, backend, "; ".join(skipped))
            return backend
        skipped.append(f"{backend}: {reason}")
    return "ref"


def available_backends(op: str, device: torch.device) -> list[str]:
    """Every backend that can run `op` on `device` (tests and benchmarks parametrize over this)."""
    return [b for b in _env.BACKENDS if why_unavailable(op, b, device) is None]
