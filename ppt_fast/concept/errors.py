"""The errors of `ppt_fast.concept`: every one a `ConceptError`, a ValueError whose message says why and what to do."""

from __future__ import annotations


class ConceptError(ValueError):
    """A concept cannot be built, written, read or applied; the message says why and what to do."""


class ConceptFileError(ConceptError):
    """A concept file is not readable: not a concept file, truncated, its checksum does not match (damaged), or what
    it declares does not hold (sizes, shapes, dtypes, indices, non-finite values: crafted or written by a bug)."""


class ConceptVersionError(ConceptError):
    """A concept file was written in a newer format than this ppt_fast reads."""


class FingerprintMismatch(ConceptError):
    """The model is not the base model the concept was tuned on (`force=True` overrides)."""


# Callers catch these as `ppt_fast.concept.<Name>` (and `ppt_fast.ConceptError`), tracebacks name them so, and
# ppt_fast.cli tells user errors by their module: they keep the package as their module, wherever they are defined.
for _cls in (ConceptError, ConceptFileError, ConceptVersionError, FingerprintMismatch):
    _cls.__module__ = "ppt_fast.concept"
del _cls
