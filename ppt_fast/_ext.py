"""Loading the compiled extension (`ppt_fast._C`), with an error that says what was built and what is running.

Importing ppt_fast never needs the extension: ops fall back to their pure-PyTorch reference when it is missing.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

log = logging.getLogger(__name__)

_load_error: str | None = None


@functools.cache
def load():
    """Import `ppt_fast._C` once; returns the module, or None (the reason is kept for `load_error()`)."""
    global _load_error
    try:
        module = importlib.import_module("ppt_fast._C")
    except (ImportError, OSError) as exc:
        _load_error = (
            f"ppt_fast._C could not be loaded ({type(exc).__name__}: {exc}). Running torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}). Rebuild it against this torch with `pip install -e . --no-build-isolation` "
            "(or `make install`); PPT_FAST_NO_EXT=1 at install time builds pure Python on purpose."
        )
        log.debug(_load_error)
        return None
    return module


def load_error() -> str | None:
    load()
    return _load_error


def has_op(name: str) -> bool:
    """True when the private op `torch.ops.ppt_fast.<name>` is registered (after loading the extension)."""
    if load() is None:
        return False
    return hasattr(torch.ops.ppt_fast, name)
