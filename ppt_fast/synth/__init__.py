"""The seeded MIDI composer and the General MIDI soundfont renderer that the evaluation's concept dataset
(:mod:`ppt_fast.eval.dataset`) and the default model's pretraining corpus (:mod:`ppt_fast.tiny.pretrain`) both use.

- :mod:`ppt_fast.synth.composer`: the instrument specs (:data:`CONCEPTS`) and :func:`compose` (note events from a
  seed), :func:`composition_tempo`, :func:`concept_seed`.
- :mod:`ppt_fast.synth.renderer`: :func:`render` (notes -> mono float32 through ``tinysoundfont`` or ``fluidsynth``),
  the soundfont lookup and checks, :func:`write_midi`, and the 16-bit PCM WAV I/O (:func:`write_wav`,
  :func:`read_wav`).

numpy and the standard library only (no torch); the renderers' own packages are imported when a clip is rendered.
"""

from __future__ import annotations

from .composer import CONCEPTS, DRUM_CHANNEL, ConceptSpec, Note, compose, composition_tempo, concept_seed
from .renderer import (
    FLUID_R3,
    RENDERERS,
    SOUNDFONT_LICENCES,
    check_renderer,
    default_soundfont,
    read_wav,
    render,
    write_midi,
    write_wav,
)

__all__ = [
    "CONCEPTS",
    "DRUM_CHANNEL",
    "FLUID_R3",
    "RENDERERS",
    "SOUNDFONT_LICENCES",
    "ConceptSpec",
    "Note",
    "check_renderer",
    "compose",
    "composition_tempo",
    "concept_seed",
    "default_soundfont",
    "read_wav",
    "render",
    "write_midi",
    "write_wav",
]
