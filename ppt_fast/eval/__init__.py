"""Offline evaluation: a rendered concept dataset, a PyTorch port of the musicnn tagger, and the four metrics.

``audio_alignment``, ``text_alignment``, ``diversity`` and ``copying`` take float audio ``[C, T]`` or ``[B, C, T]``
with its sample rate (see :mod:`ppt_fast.eval.metrics`); ``ppt_fast.eval.dataset.build(out_dir)`` renders the
concept dataset and returns its manifest path; :mod:`ppt_fast.eval.protocol` runs the methods side by side.
Nothing here needs TensorFlow, audiocraft or a network connection.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TextAlignmentScore",
    "audio_alignment",
    "clip_embeddings",
    "copying",
    "diversity",
    "retrieval",
    "text_alignment",
]


# Resolved on first access (PEP 562): the metrics import torch, and `ppt-fast --help` imports this package (its
# commands are registered from ppt_fast.eval.cli) without needing them.
def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'ppt_fast.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module("ppt_fast.eval.metrics"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
