"""Applying concepts to a model and removing them: the bookkeeping kept on the LM.

`apply` keeps a `_Registry` on the LM (the plain attribute `lm._ppt_fast_concepts`, `REGISTRY_ATTR`: not in the
state_dict): the base values of every entry an applied concept overwrote, and the applied concepts with their
scales. Every touched entry is recomputed from its base value and all applied concepts in canonical order (sorted
identifiers), so the result does not depend on the order concepts were applied or removed in, and removing the last
one gives back the base bitwise. The identifiers' token embeddings go into the LM's identifier bank, the object at
`lm._ppt_fast_identifier_bank` (`BANK_ATTR`, installed by `ppt_fast.identifiers`).

`_apply_concepts` is the one path by which concepts are applied (`Concept.apply` and `compose` check their
arguments, then call it); it runs every check before anything changes. This module uses concepts only through
their methods and attributes, so it sits below `ppt_fast.concept.concept`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConceptError
from .fingerprint import _WHOLE_BASE_SHARE, BANK_ATTR, REGISTRY_ATTR, _resolve_lm
from .portable import for_model

if TYPE_CHECKING:
    from .concept import Concept

logger = logging.getLogger(__name__)

# |scale| above this is refused: the paper's strengths are 0..2; 10 already extrapolates the tuned change tenfold, and
# larger factors mostly push parameters out of the range the model was trained in (fp16 ones towards overflow).
MAX_SCALE = 10.0


def check_scale(scale: Any) -> float:
    """`scale` as a float; ConceptError unless it is a finite number with |scale| <= MAX_SCALE."""
    try:
        if isinstance(scale, (bool, str, bytes)):
            raise TypeError
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise ConceptError(
            f"scale {scale!r} is not a number; give the concept strength as a float (1.0 = as tuned)"
        ) from None
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise ConceptError(
            f"scale {value!r} is outside [-{MAX_SCALE:g}, {MAX_SCALE:g}]; give a finite concept strength "
            "(1.0 = as tuned, 0 = the base model)"
        )
    return value



# ---------------------------------------------------------------------------------------------------------------------
# The registry on the LM: base values and applied concepts
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Applied:
    concept: Concept
    scale: float
    bank_identifiers: list[str]  # identifiers this application put into (or owns in) the bank


class _Base:
    """Base values of one tensor: `idx` (sorted int64 flat positions) + `vals`, or `idx=None` + the whole flat base."""

    def __init__(self, idx: torch.Tensor | None, vals: torch.Tensor) -> None:
        self.idx = idx
        self.vals = vals


class _Registry:
    """What `apply` keeps on the LM (`lm._ppt_fast_concepts`, a plain attribute: not in state_dict)."""

    def __init__(self) -> None:
        self.applied: dict[tuple[str, ...], _Applied] = {}
        self.base: dict[str, _Base] = {}

    @staticmethod
    def of(lm: torch.nn.Module) -> _Registry:
        reg = getattr(lm, REGISTRY_ATTR, None)
        if reg is None:
            reg = _Registry()
            object.__setattr__(lm, REGISTRY_ATTR, reg)
        return reg

    def owner_of(self, identifier: str) -> tuple[str, ...] | None:
        for k, a in self.applied.items():
            if identifier in a.concept.identifiers:
                return k
        return None

    # ---- base values ---------------------------------------------------------------------------------------------
    def base_view(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """The tensor as it is with its base values put back where concepts changed it (a copy when needed)."""
        b = self.base.get(name)
        if b is None:
            return p.detach()
        if b.idx is None:
            return b.vals.view(p.shape)
        out = p.detach().clone().reshape(-1)
        out[b.idx] = b.vals
        return out.view(p.shape)

    def save_base_values(self, name: str, p: torch.Tensor, idx: torch.Tensor | None, vals: torch.Tensor) -> None:
        """Record base values `vals` at `idx` (None: the whole tensor) unless already recorded."""
        flat = p.detach().reshape(-1)
        b = self.base.get(name)
        if b is not None and b.idx is None:
            return
        if idx is None:
            whole = vals.to(device=flat.device, dtype=flat.dtype).clone()
            if b is not None:
                whole[b.idx] = b.vals  # what was recorded first is the base
            self.base[name] = _Base(None, whole)
            return
        idx = idx.to(device=flat.device, dtype=torch.int64)
        vals = vals.to(device=flat.device, dtype=flat.dtype)
        if b is not None:
            new = ~torch.isin(idx, b.idx)
            idx = torch.cat([b.idx, idx[new]])
            vals = torch.cat([b.vals, vals[new]])
            order = torch.argsort(idx)
            idx, vals = idx[order], vals[order]
        if idx.numel() > _WHOLE_BASE_SHARE * flat.numel():
            whole = flat.clone()
            whole[idx] = vals
            self.base[name] = _Base(None, whole)
        else:
            self.base[name] = _Base(idx, vals.clone())

    def record_current(self, name: str, p: torch.Tensor, positions: torch.Tensor) -> None:
        """Record the model's current values at `positions` as base where nothing is recorded yet."""
        flat = p.detach().reshape(-1)
        b = self.base.get(name)
        if b is not None and b.idx is None:
            return
        self.save_base_values(name, p, positions, flat[positions])

    def base_at(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        b = self.base[name]
        if b.idx is None:
            return b.vals[positions]
        j = torch.searchsorted(b.idx, positions)
        if bool((j >= b.idx.numel()).any()) or not torch.equal(b.idx[j.clamp_max(b.idx.numel() - 1)], positions):
            raise RuntimeError(f"internal: base values of {name!r} missing for some positions")
        return b.vals[j]

    # ---- recompute -----------------------------------------------------------------------------------------------
    def recompute(self, lm: torch.nn.Module, names: Iterable[str], extra: Mapping[str, torch.Tensor]) -> None:
        """Write every touched entry of `names` from its base and the applied concepts in canonical order.

        `extra[name]` are positions to rewrite besides those of applied concepts (a removed concept's).
        """
        params = dict(lm.named_parameters())
        order = sorted(self.applied)
        for name in names:
            p = params[name]
            flat = p.data.view(-1)
            dev = flat.device
            # Contributors in canonical order; concepts of one joint run form one group (see `compose`).
            groups: dict[Any, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
            for k in order:
                a = self.applied[k]
                if name in a.concept.touched_names():
                    pos, tuned = a.concept._tuned(name)
                    gkey = a.concept.meta.get("joint_run") or ("solo", k)
                    groups.setdefault(gkey, []).append((pos.to(dev), tuned.to(dev), a.scale))
            contrib = [m for members in groups.values() for m in members]
            parts = [c[0] for c in contrib] + ([extra[name].to(dev)] if name in extra else [])
            if not parts:
                continue
            u = torch.unique(torch.cat(parts), sorted=True) if len(parts) > 1 else parts[0]
            base = self.base_at(name, u)
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            acc = base.to(compute, copy=True)  # never alias the registry's base values
            count = torch.zeros(u.numel(), dtype=torch.int32, device=dev)
            single = torch.zeros(u.numel(), dtype=compute, device=dev)
            unit = torch.zeros(u.numel(), dtype=torch.bool, device=dev)
            base_c = base.to(compute)
            for members in groups.values():
                if len(members) == 1:
                    pos, tuned, scale = members[0]
                    j = torch.searchsorted(u, pos)
                    t = tuned.to(compute)
                    acc[j] += scale * (t - base_c[j])
                    count[j] += 1
                    single[j] = t
                    unit[j] = scale == 1.0
                    continue
                # A joint run: members sharing an entry contribute the MEAN of their scaled deltas (one delta, as
                # trained); the jointly tuned value itself where all of them hold the same value at scale 1.
                gsum = torch.zeros(u.numel(), dtype=compute, device=dev)
                gcnt = torch.zeros(u.numel(), dtype=torch.int32, device=dev)
                gfirst = torch.zeros(u.numel(), dtype=compute, device=dev)
                gexact = torch.ones(u.numel(), dtype=torch.bool, device=dev)
                for pos, tuned, scale in members:
                    j = torch.searchsorted(u, pos)
                    t = tuned.to(compute)
                    gsum[j] += scale * (t - base_c[j])
                    first = gcnt[j] == 0
                    gfirst[j] = torch.where(first, t, gfirst[j])
                    gexact[j] &= (scale == 1.0) & (first | (gfirst[j] == t))
                    gcnt[j] += 1
                held = gcnt > 0
                acc[held] += gsum[held] / gcnt[held].to(compute)
                count[held] += 1
                single[held] = gfirst[held]
                unit[held] = gexact[held]
            out = torch.where((count == 1) & unit, single, acc).to(p.dtype)
            out = torch.where(count == 0, base, out)
            flat[u] = out
            if not contrib:
                del self.base[name]

    def add(self, lm: torch.nn.Module, items: Sequence[tuple[Concept, float]]) -> None:
        params = dict(lm.named_parameters())
        names: set[str] = set()
        for c, _ in items:
            for n in c.touched_names():
                self.record_current(n, params[n], c._positions(n, params[n].device))
                names.add(n)
        for c, scale in items:
            self.applied[c.key] = _Applied(c, float(scale), [])
        with torch.no_grad():
            self.recompute(lm, sorted(names), {})

    def remove(self, lm: torch.nn.Module, key: tuple[str, ...]) -> None:
        a = self.applied.pop(key)
        params = dict(lm.named_parameters())
        names = a.concept.touched_names()
        extra = {n: a.concept._positions(n, params[n].device) for n in names}
        with torch.no_grad():
            self.recompute(lm, names, extra)
        bank = getattr(lm, BANK_ATTR, None)
        for ident in a.bank_identifiers:
            if bank is not None and bank.has(ident):
                bank.remove(ident)
        if not self.applied:
            self.base.clear()
            object.__delattr__(lm, REGISTRY_ATTR)


# ---------------------------------------------------------------------------------------------------------------------
# Applying, removing, reporting
# ---------------------------------------------------------------------------------------------------------------------
def _check_verified(c: Concept) -> None:
    missing = c.unverified_names()
    if missing:
        where = f" (from {c.source!r})" if c.source else ""
        raise ConceptError(
            f"concept {c.identifiers}{where} has no base-model fingerprint for {len(missing)} of the tensors it "
            f"changes ({', '.join(repr(n) for n in missing[:3])}{', ...' if len(missing) > 3 else ''}): nothing "
            "checks that it was tuned on this model. Capture it with base=snapshot_base(...) taken before tuning, "
            "or pass allow_unverified=True (ppt-fast generate --allow-unverified) to apply it anyway"
        )


def _apply_concepts(
    concepts: Sequence[Concept], model: Any, scales: Sequence[float], *, force: bool, allow_unverified: bool
) -> dict[str, Any]:
    """Apply `concepts` (distinct, each with its checked scale in `scales`) to `model`; the `overlap` report of all
    applied concepts. Every check runs before anything changes: each concept finite and, unless
    `allow_unverified=True`, fingerprinted for every tensor it changes; identifiers free; the model the concepts' base
    (`Concept.check_model`: `force=True` overrides a hash mismatch only); token embeddings of the bank's width."""
    for c in concepts:
        c.check_finite()  # the tensors are plain attributes: they may have been changed since construction
        if not allow_unverified:
            _check_verified(c)
    lm = _resolve_lm(model)
    concepts = [for_model(c, lm, force=force) for c in concepts]  # tuned through the other library: converted
    reg = getattr(lm, REGISTRY_ATTR, None)
    bank = getattr(lm, BANK_ATTR, None)
    memo: dict = {}  # each touched tensor is hashed once per call, however many concepts touch it
    for c in concepts:
        for ident in c.identifiers:
            owner = reg.owner_of(ident) if reg is not None else None
            if owner is not None:
                raise ConceptError(
                    f"identifier {ident!r} is already applied to this model (concept {list(owner)}); applying twice "
                    "is refused: remove it first (concept.remove(model))"
                )
            if bank is not None and bank.has(ident):
                raise ConceptError(
                    f"identifier {ident!r} is already registered in this model's identifier bank (by a tune run?); "
                    "remove it there first"
                )
        c.check_model(lm, force=force, _memo=memo)
        dim = getattr(bank, "dim", None)
        for ident, t in c.tokens.items():
            if bank is not None and dim is not None and t.shape[1] != dim:
                raise ConceptError(
                    f"tokens of {ident!r} are {t.shape[1]}-d, this model's identifier bank takes {dim}-d embeddings "
                    "(the concept was tuned on another model)"
                )
    if bank is None and any(c.tokens for c in concepts):
        logger.warning(
            "this model has no identifier bank (lm.%s): the concepts' parameter changes are applied but their "
            "identifier tokens %s are not installed (load the model with ppt_fast.load_model for prompts that name "
            "them)",
            BANK_ATTR,
            [i for c in concepts for i in c.tokens],
        )
    reg = _Registry.of(lm)
    reg.add(lm, list(zip(concepts, scales)))
    if bank is not None:
        dev = next(iter(lm.parameters())).device
        for c in concepts:
            for ident, t in c.tokens.items():
                bank.add(ident, t.to(dev))
                reg.applied[c.key].bank_identifiers.append(ident)
    report = overlap([a.concept for a in reg.applied.values()])
    if report["shared"]:
        logger.info("composed concepts share %d entries: %s", report["shared"], report["pairs"])
    return report


def remove_all(model: Any) -> None:
    """Remove every applied concept; the model is back to its base bitwise."""
    lm = _resolve_lm(model)
    reg: _Registry | None = getattr(lm, REGISTRY_ATTR, None)
    while reg is not None and reg.applied:
        reg.remove(lm, sorted(reg.applied)[-1])
        reg = getattr(lm, REGISTRY_ATTR, None)


def applied_concepts(model: Any) -> list[Concept]:
    """The concepts applied to `model`, in canonical order."""
    reg: _Registry | None = getattr(_resolve_lm(model), REGISTRY_ATTR, None)
    return [] if reg is None else [reg.applied[k].concept for k in sorted(reg.applied)]


def overlap(concepts: Sequence[Concept]) -> dict[str, Any]:
    """Entries touched by more than one concept: `{"shared": total entries touched by >= 2, "pairs": {"a+b": n},
    "per_tensor": {name: n}, "touched": {identifiers: n}}` (pair keys join each concept's sorted identifiers by ',')."""
    concepts = sorted(concepts, key=lambda c: c.key)
    labels = [",".join(c.key) for c in concepts]
    pairs: dict[str, int] = {}
    per_tensor: dict[str, int] = {}
    touched = {lab: c.touched_count() for lab, c in zip(labels, concepts)}
    names = sorted({n for c in concepts for n in c.touched_names()})
    for n in names:
        pos = {lab: c._positions(n, None) for lab, c in zip(labels, concepts) if n in c.touched_names()}
        if len(pos) < 2:
            continue
        labs = list(pos)
        for i in range(len(labs)):
            for j in range(i + 1, len(labs)):
                s = int(torch.isin(pos[labs[i]], pos[labs[j]]).sum())
                if s:
                    key = f"{labs[i]}+{labs[j]}"
                    pairs[key] = pairs.get(key, 0) + s
        allpos = torch.cat(list(pos.values()))
        _, counts = torch.unique(allpos, return_counts=True)
        shared = int((counts > 1).sum())
        if shared:
            per_tensor[n] = shared
    return {"shared": sum(per_tensor.values()), "pairs": pairs, "per_tensor": per_tensor, "touched": touched}


