"""Fingerprints of base weights, and the base values a tune run will change.

- `fingerprint_model(model, names)`: per tensor of the LM its name, shape, dtype, the sha256 of its exact bytes and
  of its values rounded to bf16; a concept stores it for the tensors it touches and is checked against it on apply.
- `snapshot_base(model, pivots, dense)`: that fingerprint plus copies of the values a run will change
  (`BaseSnapshot`), taken before training so the tuned model can be registered and later restored bitwise.
- `state_digest(module)`: one sha256 over a whole module's state_dict (names, dtypes, shapes, bytes), the identity
  of a base model or codec (the hosts key caches and records runs by it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..pivots import PivotSet
from .errors import ConceptError
from .format import _bytes_of

#: The LM attributes (plain, out of state_dict) holding the applied concepts' registry and the identifier bank.
REGISTRY_ATTR = "_ppt_fast_concepts"
BANK_ATTR = "_ppt_fast_identifier_bank"

# A tensor whose touched share passes this keeps a whole clone of its base (cheaper than indices + values).
_WHOLE_BASE_SHARE = 0.25


def _resolve_lm(model: Any) -> torch.nn.Module:
    """The LM module of `model`: an nn.Module, or an object with an `.lm` nn.Module (audiocraft MusicGen)."""
    lm = getattr(model, "lm", None)
    if isinstance(lm, torch.nn.Module):
        return lm
    if isinstance(model, torch.nn.Module):
        return model
    raise TypeError(
        f"model must be an nn.Module (the LM) or an object with an `.lm` nn.Module (audiocraft MusicGen), "
        f"got {type(model).__name__}"
    )


def _tensor_hashes(t: torch.Tensor) -> dict[str, str]:
    """sha256 of the exact bytes, and of the values rounded to bf16 (matches a bf16 copy of an fp32 model)."""
    exact = hashlib.sha256(_bytes_of(t)).hexdigest()
    canon = t if t.dtype == torch.bfloat16 else t.detach().to(torch.bfloat16)
    return {"sha256": exact, "sha256_bf16": hashlib.sha256(_bytes_of(canon)).hexdigest()}


def _fingerprint_entry(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), **_tensor_hashes(t)}


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes, bytes); identifies a base model or codec.

    Per item in sorted-name order: `f"{name}|{dtype}|{shape}|"`, then the tensor's bytes in row-major order.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes_of(t))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Base snapshots (what tune() takes before training so the tuned model can later be restored and checked)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class BaseSnapshot:
    """The base model's fingerprint and its values at the entries a run will train (taken before training).

    `values[name]` is `(flat_idx int64 [n] | None, base values [n] or the whole flat tensor, in the param's dtype)`.
    """

    fingerprint: dict[str, Any]
    values: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)

    @torch.no_grad()
    def restore(self, model: Any) -> None:
        """Write the snapshot's base values back into `model`'s LM (bitwise): undo a run that did not finish."""
        params = dict(_resolve_lm(model).named_parameters())
        for n, (idx, vals) in self.values.items():
            flat = params[n].view(-1)
            if idx is None:
                flat.copy_(vals)
            else:
                flat[idx] = vals


def fingerprint_model(model: Any, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Fingerprint of the LM's tensors `names` (all parameters when None): name -> shape, dtype, sha256s.

    Call it on the base model before tuning and pass it to `Concept.capture(base=...)`.
    """
    lm = _resolve_lm(model)
    params = dict(lm.named_parameters())
    names = list(params) if names is None else list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise ConceptError(f"fingerprint_model: the model has no parameters {missing[:3]}")
    return {"algorithm": "sha256", "tensors": {n: _fingerprint_entry(params[n].detach()) for n in names}}


def _touched_flat(shape: torch.Size, rows: tuple[int, int] | None) -> tuple[int, int]:
    numel = shape.numel()
    if rows is None:
        return 0, numel
    row = numel // shape[0] if len(shape) and shape[0] else 1
    return rows[0] * row, rows[1] * row


def snapshot_base(
    model: Any, pivots: PivotSet | None = None, dense: Mapping[str, slice | tuple[int, int] | None] | None = None
) -> BaseSnapshot:
    """Fingerprint + copies of the base values a run will change (the pivots and the dense rows); take it BEFORE
    training and pass it to `Concept.capture(base=...)`: the concept is then registered as applied on the tuned
    model, so `concept.remove(model)` restores the base bitwise."""
    lm = _resolve_lm(model)
    params = dict(lm.named_parameters())
    dense_rows = _norm_dense(dense or {}, params)
    names = sorted(
        set((n for n, c in zip(pivots.names, pivots.counts()) if c) if pivots is not None else []) | set(dense_rows)
    )
    snap = BaseSnapshot(fingerprint_model(lm, names))
    for n in names:
        p = params[n].detach()
        flat = p.reshape(-1)
        parts = []
        if pivots is not None and n in pivots.names:
            parts.append(pivots.indices_of(n).to(device=p.device, dtype=torch.int64))
        if n in dense_rows:
            lo, hi = _touched_flat(p.shape, dense_rows[n])
            parts.append(torch.arange(lo, hi, device=p.device))
        idx = torch.unique(torch.cat(parts), sorted=True)
        if idx.numel() > _WHOLE_BASE_SHARE * flat.numel():
            snap.values[n] = (None, flat.clone())
        else:
            snap.values[n] = (idx, flat[idx].clone())
    return snap


def _norm_dense(dense: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int] | None]:
    out: dict[str, tuple[int, int] | None] = {}
    for n, rows in dense.items():
        if n not in params:
            raise ConceptError(f"dense names {n!r}, which is not a parameter of the model")
        p = params[n]
        if rows is None:
            out[n] = None
            continue
        if isinstance(rows, slice):
            if rows.step not in (None, 1):
                raise ConceptError(f"dense[{n!r}]: row slices must have step 1, got {rows}")
            lo, hi, _ = rows.indices(p.shape[0] if p.dim() else 1)
        else:
            lo, hi = (int(r) for r in rows)
        if not 0 <= lo < hi <= (p.shape[0] if p.dim() else 1):
            raise ConceptError(f"dense[{n!r}]: rows [{lo}:{hi}] are empty or outside {tuple(p.shape)}")
        out[n] = None if (lo, hi) == (0, p.shape[0] if p.dim() else 1) else (lo, hi)
    return out

