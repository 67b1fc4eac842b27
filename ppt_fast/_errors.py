"""Which exceptions are the user's (bad input: one line naming the problem and the fix) and which are bugs (a
traceback to report): the rule `ppt-fast` (exit 2 vs 1, `ppt_fast.cli`) and the app (`ppt_fast.app`: the message in
the page vs "this is a bug") share.

Bad input is: `UsageError`; every error class of the library (all `ValueError` subclasses defined in ppt_fast:
`ConceptError`, `AudioError`, `TuneError`, `PivotError`, `ScopeError`, `CorruptFileError`, `PretrainError`,
`NaNScoresError`, ...) and a plain `ValueError` raised by ppt_fast's own argument checks; an `OSError` about a
path (`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, `NotADirectoryError`, or any with a file
name, a full disk, a read-only file system); an `ImportError` of a missing optional package (its message says
what to install; not one inside ppt_fast itself). Anything else is a bug.
"""

from __future__ import annotations

import errno


class UsageError(Exception):
    """A problem with the user's input: printed as `ppt-fast: error: ...` with exit code 2."""


_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def raised_in_ppt_fast(e: BaseException) -> bool:
    """The innermost Python frame of `e`'s traceback is ppt_fast code (our own check raised it)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == "ppt_fast" or module.startswith("ppt_fast.")


def is_user_error(e: BaseException) -> bool:
    """Whether `e` is bad input (exit 2, one line) rather than a bug (exit 1, traceback); see the module docstring."""
    if isinstance(e, ImportError):  # a missing optional package, not a broken ppt_fast (`from .x import gone`)
        return not (e.name or "").startswith("ppt_fast")
    if isinstance(e, (UsageError, *_PATH_ERRORS)):
        return True
    if isinstance(e, OSError):
        return e.filename is not None or e.errno in _ENV_ERRNOS
    if isinstance(e, ValueError):
        module = type(e).__module__
        return module == "ppt_fast" or module.startswith("ppt_fast.") or raised_in_ppt_fast(e)
    return False
