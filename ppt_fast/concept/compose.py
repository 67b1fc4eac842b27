"""Several concepts on one model: `compose` applies them at once, alongside any already applied.

Entries touched by several applied concepts get, from their base value, the sum of the concepts' scaled deltas in
canonical order (see the `ppt_fast.concept` docstring); the bookkeeping is `ppt_fast.concept.registry`'s, and so is
`overlap`, the report of which entries the applied concepts share (`Concept.apply` logs it too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .concept import Concept, _check_distinct
from .errors import ConceptError
from .registry import _apply_concepts, check_scale


def compose(
    concepts: Sequence[Concept],
    model: Any,
    scales: Sequence[float] | None = None,
    *,
    force: bool = False,
    allow_unverified: bool = False,
) -> dict[str, Any]:
    """Apply several concepts at once (alongside any already applied); returns the `overlap` report of all of them.

    The union of their pivots is changed; entries shared by several concepts get the sum of their scaled deltas from
    the base, computed in the canonical order (sorted identifiers), so the result does not depend on the order of
    `concepts` or on which were applied first. Every check runs before anything changes: scales finite with
    |scale| <= MAX_SCALE, every concept finite and, unless `allow_unverified=True`, fingerprinted for every tensor
    it changes; identifiers free; the model the concepts' base (`force=True` overrides a hash mismatch only).
    """
    concepts = list(concepts)
    if scales is None:
        scales = [1.0] * len(concepts)
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise ConceptError(f"compose: scales must be a list of numbers, got {type(scales).__name__}")
    scales = [check_scale(s) for s in scales]
    if len(scales) != len(concepts):
        raise ConceptError(f"compose: {len(scales)} scales for {len(concepts)} concepts; give one scale per concept")
    _check_distinct(concepts)
    return _apply_concepts(concepts, model, scales, force=force, allow_unverified=allow_unverified)
