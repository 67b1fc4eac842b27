"""ppt_fast: Pivotal Parameters Tuning for text-to-music models, with fused kernels.

Importing this package imports only `__version__` (no torch, no numpy, so `ppt-fast --help` starts in a fraction
of a second): every public name, the ops and pivot sets included, loads on first access; audiocraft, triton and the
compiled extension on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# Every public name but __version__, resolved on first access (PEP 562): the modules behind them import torch.
_LAZY = {
    # The low layers: the ops and the pivot sets.
    "select_pivots": "ppt_fast.ops",
    "sensitivity_accumulate": "ppt_fast.ops",
    "sparse_adamw_step": "ppt_fast.ops",
    "PivotError": "ppt_fast.pivots",
    "PivotSet": "ppt_fast.pivots",
    # The modules above them.
    "SparseAdamW": "ppt_fast.optim",
    "DenseMaskedAdamW": "ppt_fast.optim",
    "freeze_unpivoted": "ppt_fast.optim",
    "SensitivityAccumulator": "ppt_fast.sensitivity",
    "RowGrads": "ppt_fast.rowgrad",
    "Scope": "ppt_fast.scope",
    "Concept": "ppt_fast.concept",
    "ConceptDelta": "ppt_fast.concept",
    "tune": "ppt_fast.tuning",
    "TuneConfig": "ppt_fast.tuning",
    "TuneProgress": "ppt_fast.tuning",
    "TuneCancelled": "ppt_fast.tuning",
    "generate": "ppt_fast.generation",
    "load_model": "ppt_fast.models",
    "write_wav": "ppt_fast.audio",
    "fit_peak": "ppt_fast.audio",
    # The error classes to catch (every one a ValueError; UnwritablePathError an OSError too).
    "ConceptError": "ppt_fast.concept",
    "AudioError": "ppt_fast.audio",
    "TuneError": "ppt_fast.tuning",
    "GenerateError": "ppt_fast.generation",
    "DistributedError": "ppt_fast.distributed",
    "UnwritablePathError": "ppt_fast._io",
}

__all__ = ["PivotError", "PivotSet", "__version__", "select_pivots", "sensitivity_accumulate", "sparse_adamw_step"]
__all__ += [name for name in _LAZY if name not in __all__]


def _quiet_xformers_on_cpu() -> None:
    """Drop xFormers' import-time warning that its C++/CUDA extensions do not match the installed torch, where torch
    is a CPU build. audiocraft imports xformers unconditionally (`audiocraft.modules.transformer`) but on CPU uses only
    its pure-Python parts (attention runs in torch), so every command that imports audiocraft (the hosts, the tiny
    model, pretraining) would print six lines that need no action. Any other xformers message, and this one with a
    CUDA or ROCm torch, is kept. Installed here, before anything in ppt_fast can import audiocraft (so xformers)."""
    import logging
    import sys

    prefix = "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions."

    def keep(record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(prefix):
            return True
        version = getattr(sys.modules.get("torch"), "version", None)
        return getattr(version, "cuda", None) is not None or getattr(version, "hip", None) is not None

    logging.getLogger("xformers").addFilter(keep)


_quiet_xformers_on_cpu()
del _quiet_xformers_on_cpu


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ppt_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
