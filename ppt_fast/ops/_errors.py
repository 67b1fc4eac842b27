"""Errors the ops' backends raise, in a module of their own so that the kernels can raise them without importing the
op that dispatches to them (kernels sit below ops)."""

from __future__ import annotations

NAN_MESSAGE = "ppt_fast: NaN score"  # every backend raises an error containing this when it meets a NaN key


class NaNScoresError(ValueError):
    """Raised by a backend that met a NaN key; the public wrapper re-raises it naming the tensor."""
