"""The audiocraft host: `AudiocraftHost` (the Host protocol for an audiocraft `MusicGen`), its model builders
(`build`), reference encoding (`data`), training loss (`loss`), every patch with its revert (`patches`) and the
optimizer for audiocraft's own solvers (`solver`, enabled by `apply_ppt_to_audiocraft()`). Importing this package
does not import audiocraft."""

from __future__ import annotations

from .host import AudiocraftHost
from .patches import apply_ppt_to_audiocraft, revert_ppt_to_audiocraft

__all__ = ["AudiocraftHost", "apply_ppt_to_audiocraft", "revert_ppt_to_audiocraft"]
