"""Offline evaluation: a rendered concept dataset, a PyTorch port of the musicnn tagger, and the four metrics.

``audio_alignment``, ``text_alignment``, ``diversity`` and ``copying`` take float audio ``[C, T]`` or ``[B, C, T]``
with its sample rate (see :mod:`ppt_fast.eval.metrics`); ``ppt_fast.eval.dataset.build(out_dir)`` renders the
concept dataset and returns its manifest path; :mod:`ppt_fast.eval.protocol` runs the methods side by side.
Nothing here needs TensorFlow, audiocraft or a network connection.
"""

from __future__ import annotations

from .metrics import TextAlignmentScore, audio_alignment, clip_embeddings, copying, diversity, retrieval, text_alignment

__all__ = [
    "TextAlignmentScore",
    "audio_alignment",
    "clip_embeddings",
    "copying",
    "diversity",
    "retrieval",
    "text_alignment",
]
