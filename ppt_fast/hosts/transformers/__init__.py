"""The transformers host: `TransformersHost` (the Host protocol for a Hugging Face
`MusicgenForConditionalGeneration`), its offline builders and loader (`build`) and its patches with their reverts
(`patches`: identifier tokens in the text condition). Importing this package does not import transformers."""

from __future__ import annotations

from .host import TransformersHost

__all__ = ["TransformersHost"]
