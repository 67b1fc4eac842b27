"""Hosts: the model libraries ppt_fast tunes. `base.Host` is the protocol the tune loop and `generate()` use;
`audiocraft` implements it for audiocraft's MusicGen. `ppt_fast.models.load_host` picks the host for a model."""

from __future__ import annotations

from .base import Host

__all__ = ["Host"]
