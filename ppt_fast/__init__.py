"""ppt_fast: Pivotal Parameters Tuning for text-to-music models, with fused kernels.

Importing this package never imports audiocraft, triton or the compiled extension; those load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .ops import select_pivots, sensitivity_accumulate, sparse_adamw_step
from .pivots import PivotError, PivotSet

# Public names that live in modules with heavier imports, resolved on first access (PEP 562).
_LAZY = {
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
    "generate": "ppt_fast.generation",
    "load_model": "ppt_fast.models",
    "write_wav": "ppt_fast.audio",
    "fit_peak": "ppt_fast.audio",
    # The error classes to catch (every one a ValueError; UnwritablePathError an OSError too).
    "ConceptError": "ppt_fast.concept",
    "AudioError": "ppt_fast.audio",
    "TuneError": "ppt_fast.tuning",
    "GenerateError": "ppt_fast.generation",
    "UnwritablePathError": "ppt_fast._io",
}

__all__ = [
    "PivotError",
    "PivotSet",
    "__version__",
    "select_pivots",
    "sensitivity_accumulate",
    "sparse_adamw_step",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ppt_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
