"""audiocraft/MusicGen integration: models, reference data, identifier tokens, the tune loop, generation, and the
optimizer seam for audiocraft's own solver. Importing this package does not import audiocraft."""

from __future__ import annotations

from .generate import generate
from .models import load_model
from .tune import tune

__all__ = ["generate", "load_model", "tune"]
