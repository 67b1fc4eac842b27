"""Concept files: what a tune run learned, packed, checked, and applied to / removed from / combined on a base model.

A `Concept` holds
- `identifiers` and their `tokens` (`identifier -> [n_tokens, dim]` fp32 embeddings in the text conditioner's output
  space, installed into the LM's identifier bank on `apply`);
- `pivots` (a `PivotSet` over the LM's parameter names, flat int32 indices into the *whole* parameter) and `values`
  (`[k]`, the TUNED values at the pivots, in the order of `pivots.indices`; fp32, fp16 or bf16 storage);
- `dense` (`name -> tuned values` of tensors or row ranges trained densely; the rows in `dense_rows`);
- `fingerprint` of the base model (name, shape, dtype and sha256 of every tensor the concept touches) and `meta`.

Storing tuned values rather than differences is what makes apply / remove / reload bitwise with fp32 storage. On
`apply` the model's overwritten base values are kept on the LM (a registry attribute, `lm._ppt_fast_concepts`), so
`remove` restores every parameter bitwise whatever its dtype, and every entry touched by several concepts is
recomputed from its base value and all applied concepts in a canonical order (sorted by identifiers):

    θ = base + Σ_c scale_c · (tuned_c − base)      (in fp32, or fp64 for fp64 parameters)

except where exactly one applied concept touches an entry at scale 1, which gets `tuned` itself (cast to the
parameter's dtype). Concepts of one joint run (same `meta["joint_run"]`) count once at the entries they share (the
mean of their scaled deltas; the jointly tuned value at scale 1). The result does not depend on the order concepts
were applied or removed in.

Applying a concept whose identifier is already applied is refused (`ConceptError`); remove it first. A concept
without a base fingerprint for some tensor it touches cannot be checked against the model: applying it needs an
explicit `allow_unverified=True`. Every stored value (tuned values, dense values, token embeddings) is finite:
construction, capture, save and load refuse NaN / inf naming the tensor, and `scale` must be finite with
|scale| <= `MAX_SCALE`.

File format: see docs/concept_format.md (safetensors, JSON header, varint-packed index gaps, sha256 checksum,
atomic writes). A file holds one concept or several (a bundle); `Concept.load` reads a one-concept file and
`load_concepts` reads either into a list.

Modules, each importing only those above it in this list:
- `errors`: `ConceptError` and its subclasses (their `__module__` is this package);
- `format`: the file's bytes <-> header fields and tensors (varint packing, checksum, the checked decoder);
- `fingerprint`: fingerprints of base weights (`fingerprint_model`, `state_digest`), `snapshot_base`;
- `portable`: a concept for the same checkpoint loaded through the other library (audiocraft <-> transformers;
  `convert`; `apply` on the other library's model converts on the fly);
- `registry`: applying / removing on a model (the registry on the LM, `REGISTRY_ATTR`, `BANK_ATTR`, `overlap`);
- `concept`: the `Concept` object, `save_concepts` / `load_concepts`;
- `compose`: several concepts at once.
"""

from __future__ import annotations

# `name as name`: re-exported besides `__all__` (the hosts, the tune loop, ppt_fast.eval and the tests import them).
from .compose import compose
from .concept import Concept, ConceptDelta, describe_concept, load_concepts, save_concepts
from .errors import ConceptError, ConceptFileError, ConceptVersionError, FingerprintMismatch
from .fingerprint import BaseSnapshot, fingerprint_model, snapshot_base
from .fingerprint import state_digest as state_digest
from .format import FORMAT as FORMAT
from .format import FORMAT_VERSION as FORMAT_VERSION
from .portable import convert
from .registry import BANK_ATTR as BANK_ATTR
from .registry import MAX_SCALE as MAX_SCALE
from .registry import REGISTRY_ATTR as REGISTRY_ATTR
from .registry import _check_verified as _check_verified
from .registry import applied_concepts, overlap, remove_all
from .registry import check_scale as check_scale

__all__ = [
    "BaseSnapshot",
    "Concept",
    "ConceptDelta",
    "ConceptError",
    "ConceptFileError",
    "ConceptVersionError",
    "FingerprintMismatch",
    "applied_concepts",
    "compose",
    "convert",
    "describe_concept",
    "fingerprint_model",
    "load_concepts",
    "overlap",
    "remove_all",
    "save_concepts",
    "snapshot_base",
]
