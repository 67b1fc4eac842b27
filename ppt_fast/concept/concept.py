"""The `Concept` object: what a tune run learned (see the package docstring), built from a tuned model (`capture`),
checked against a model (`check_model`), applied / removed (through `ppt_fast.concept.registry`), written and read
(`save_concepts` / `load_concepts`, through `ppt_fast.concept.format`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..pivots import PivotError, PivotSet
from .errors import ConceptError, ConceptFileError, FingerprintMismatch
from .fingerprint import BaseSnapshot, _fingerprint_entry, _norm_dense, _resolve_lm
from .format import (
    _STORAGE_DTYPES,
    _bytes_of,
    _decode_entry,
    _dtype_name,
    _header_entries,
    _read_file,
    _write_file,
)
from .registry import BANK_ATTR, REGISTRY_ATTR, _Applied, _apply_concepts, _Registry, check_scale

logger = logging.getLogger(__name__)


def _count_nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.numel() else 0


def _json_safe_meta(obj: Any) -> Any:
    """`meta` as strict JSON: non-finite floats become their names ("inf", "nan"); other objects their str()."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe_meta(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe_meta(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    return str(obj)


def _joint_run_id(result: Any, idents: Sequence[str]) -> str:
    """An id shared by the concepts of one joint tune run (same base, identifiers and settings)."""
    snap = getattr(result, "base_snapshot", None)
    fp = snap.fingerprint if isinstance(snap, BaseSnapshot) else getattr(result, "base_fingerprint", None)
    blob = json.dumps(
        {"base": fp, "identifiers": sorted(idents), "settings": getattr(result, "settings", None)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# The concept
# ---------------------------------------------------------------------------------------------------------------------
class Concept:
    """One learned concept: identifiers + token embeddings, tuned values at the pivots, dense tuned values, the base
    model's fingerprint and metadata. See the `ppt_fast.concept` docstring for the semantics of apply / remove /
    compose.

    Args:
        identifiers: the words naming the concept in prompts, e.g. `["<v1>"]`; unique, non-empty.
        tokens: `identifier -> Tensor [n_tokens, dim]` (stored fp32); may be empty for a parameter-only concept.
        pivots: the entries tuned sparsely (tensors without pivots are dropped from the stored layout).
        values: `Tensor [pivots.count]`, the tuned values at `pivots.indices` (fp32, fp16 or bf16).
        dense: `name -> Tensor` tuned values of a whole tensor (shape of the parameter) or of rows `dense_rows[name]`
            (shape `[hi - lo, *param.shape[1:]]`).
        dense_rows: `name -> (lo, hi) | None` (None: the whole tensor); missing names mean the whole tensor.
        fingerprint: the base model's fingerprint of the touched tensors (`fingerprint_model`); `{}` skips checks.
        meta: JSON-serialisable metadata (preset, ratio, criterion, training settings, ...).
    """

    def __init__(
        self,
        identifiers: Sequence[str],
        tokens: Mapping[str, torch.Tensor],
        pivots: PivotSet,
        values: torch.Tensor,
        dense: Mapping[str, torch.Tensor] | None = None,
        fingerprint: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        dense_rows: Mapping[str, tuple[int, int] | None] | None = None,
    ) -> None:
        identifiers = [str(i) for i in identifiers]
        if not identifiers:
            raise ConceptError("a concept needs at least one identifier, e.g. ['<v1>']")
        for i in identifiers:
            if not i.strip() or any(c.isspace() for c in i):
                raise ConceptError(f"identifier {i!r} must be one non-empty word without spaces, e.g. '<v1>'")
        if len(set(identifiers)) != len(identifiers):
            raise ConceptError(f"identifiers {identifiers} repeat a name; each must be unique")
        extra = sorted(set(tokens) - set(identifiers))
        if extra:
            raise ConceptError(f"tokens are given for {extra}, which are not among the identifiers {identifiers}")
        if not isinstance(pivots, PivotSet):
            raise ConceptError(f"pivots must be a PivotSet, got {type(pivots).__name__}")
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != pivots.count:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ConceptError(f"values must be a 1-D tensor with pivots.count = {pivots.count} entries, got {shape}")
        if values.dtype not in _STORAGE_DTYPES.values():
            raise ConceptError(f"values dtype {values.dtype} is not float32, float16 or bfloat16")
        try:  # indices in range and strictly increasing per tensor: the contract the packing relies on
            pivots.check()
        except PivotError as e:
            raise ConceptError(f"pivots: {e}") from None
        keep = [i for i, c in enumerate(pivots.counts()) if c]
        if len(keep) != len(pivots.names):
            pivots = PivotSet(
                [pivots.names[i] for i in keep],
                [pivots.shapes[i] for i in keep],
                torch.tensor([0] + [pivots.counts()[i] for i in keep]).cumsum(0),
                pivots.indices,
            )
        self.identifiers: list[str] = identifiers
        self.tokens: dict[str, torch.Tensor] = {}
        for ident, t in tokens.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1:
                raise ConceptError(f"tokens[{ident!r}] must be a [n_tokens, dim] tensor")
            self.tokens[ident] = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.pivots: PivotSet = pivots.to("cpu")
        self.values: torch.Tensor = values.detach().cpu().contiguous()
        dense = dict(dense or {})
        dense_rows = dict(dense_rows or {})
        self.dense: dict[str, torch.Tensor] = {}
        self.dense_rows: dict[str, tuple[int, int] | None] = {}
        for n, t in dense.items():
            if t.dtype not in _STORAGE_DTYPES.values():
                raise ConceptError(f"dense[{n!r}] dtype {t.dtype} is not float32, float16 or bfloat16")
            rows = dense_rows.get(n)
            if rows is not None:
                lo, hi = int(rows[0]), int(rows[1])
                if t.dim() == 0 or t.shape[0] != hi - lo or lo < 0:
                    raise ConceptError(f"dense[{n!r}] has shape {tuple(t.shape)}, rows [{lo}:{hi}] need {hi - lo}")
                rows = (lo, hi)
            self.dense[n] = t.detach().cpu().contiguous()
            self.dense_rows[n] = rows
        self.fingerprint: dict[str, Any] = json.loads(json.dumps(dict(fingerprint or {}), allow_nan=False))
        self.meta: dict[str, Any] = _json_safe_meta(dict(meta or {}))
        #: the file the concept was read from (`load_concepts`), named in error messages; None when built in memory
        self.source: str | None = None
        self.check_finite()

    # ---- facts -----------------------------------------------------------------------------------------------------
    @property
    def key(self) -> tuple[str, ...]:
        """The canonical sort key of the concept (its identifiers, sorted); the order of composition."""
        return tuple(sorted(self.identifiers))

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.values.dtype

    def touched_names(self) -> list[str]:
        """Parameter names the concept changes (pivots or dense), sorted."""
        return sorted(set(self.pivots.names) | set(self.dense))

    def touched_count(self) -> int:
        """Entries the concept changes (a pivot inside a dense range counts once)."""
        return sum(int(self._positions(n, None).numel()) for n in self.touched_names())

    def unverified_names(self) -> list[str]:
        """Touched tensors the fingerprint holds no sha256 for: nothing checks that the concept was tuned on the base
        they are applied to. Applying a concept with any needs `allow_unverified=True`."""
        tensors = self.fingerprint.get("tensors", {}) if isinstance(self.fingerprint, Mapping) else {}
        return [
            n for n in self.touched_names() if not isinstance(tensors.get(n), Mapping) or not tensors[n].get("sha256")
        ]

    def check_finite(self) -> None:
        """ConceptError naming the first tensor (tuned values, dense values, token embeddings) with a NaN or inf."""
        o = self.pivots.offsets_list
        for i, name in enumerate(self.pivots.names):
            bad = _count_nonfinite(self.values[o[i] : o[i + 1]])
            if bad:
                self._nonfinite(f"the tuned values of {name!r}", bad)
        for name, t in self.dense.items():
            bad = _count_nonfinite(t)
            if bad:
                self._nonfinite(f"the dense tuned values of {name!r}", bad)
        for ident, t in self.tokens.items():
            bad = _count_nonfinite(t)
            if bad:
                self._nonfinite(f"the token embeddings of {ident!r}", bad)

    def _nonfinite(self, what: str, bad: int) -> None:
        raise ConceptError(
            f"concept {self.identifiers}: {what} hold {bad} non-finite entries (NaN or inf); a concept must be finite. "
            "A tuning run that produced them diverged (lower the learning rate, keep gradient clipping on); a file "
            "that holds them is damaged or crafted: write it again from a good run"
        )

    def __repr__(self) -> str:
        return (
            f"Concept({self.identifiers}, {self.pivots.count} pivots in {len(self.pivots.names)} tensors, "
            f"{len(self.dense)} dense, storage={_dtype_name(self.storage_dtype)})"
        )

    # ---- building ----------------------------------------------------------------------------------------------------
    @classmethod
    def capture(
        cls,
        model: Any,
        pivots: PivotSet | str | None = None,
        *,
        identifiers: Sequence[str] | None = None,
        tokens: Mapping[str, torch.Tensor] | None = None,
        dense: Mapping[str, slice | tuple[int, int] | None] | None = None,
        base: BaseSnapshot | Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        storage_dtype: torch.dtype = torch.float32,
    ) -> Concept:
        """Read a concept out of a tuned model.

        Args:
            model: the tuned LM (nn.Module) or an object with `.lm`. Also accepted: a `TuneResult` of
                `ppt_fast.tuning.tune_model` with `pivots` = the identifier to capture.
            pivots: the entries tuned sparsely (whole-parameter flat int32 indices, names = LM parameter names).
            identifiers, tokens: the concept's identifiers and `[n_tokens, dim]` embeddings.
            dense: `name -> row slice | (lo, hi) | None` (None: the whole tensor) trained densely.
            base: the base model before tuning: a `BaseSnapshot` (`snapshot_base`, best: fingerprint + base values,
                and the concept is registered as applied so `remove` restores the base bitwise), a fingerprint
                (`fingerprint_model`), or `{name: original tensor}` of the touched tensors. None: no fingerprint
                (a warning; the concept can then be applied to any model with the same names and shapes).
            meta: metadata to store (preset, ratio, criterion, training settings); the ppt_fast version is added.
            storage_dtype: float32 (bitwise exact), float16 or bfloat16 for the values and dense tensors.
        """
        if not isinstance(model, torch.nn.Module) and hasattr(model, "pivots") and hasattr(model, "tokens"):
            return cls._capture_result(model, pivots, storage_dtype=storage_dtype)
        if pivots is None or not isinstance(pivots, PivotSet):
            raise ConceptError(f"capture: pivots must be a PivotSet, got {type(pivots).__name__}")
        if not identifiers:
            raise ConceptError("capture: give identifiers=[...], e.g. ['<v1>']")
        _dtype_name(storage_dtype)
        lm = _resolve_lm(model)
        params = dict(lm.named_parameters())
        dense_rows = _norm_dense(dense or {}, params)
        values_parts = []
        for n, idx in pivots:
            if idx.numel() == 0:
                continue
            if n not in params:
                raise ConceptError(f"capture: the pivots name {n!r}, which is not a parameter of the model")
            p = params[n]
            if p.shape != pivots.shapes[pivots.index(n)]:
                raise ConceptError(
                    f"capture: {n!r} has shape {tuple(p.shape)}, the pivots say {tuple(pivots.shapes[pivots.index(n)])}"
                )
            values_parts.append(p.detach().reshape(-1)[idx.to(p.device).long()].float().cpu())
        values = torch.cat(values_parts) if values_parts else torch.empty(0)
        dense_vals = {}
        for n, rows in dense_rows.items():
            t = params[n].detach()
            t = t if rows is None else t[rows[0] : rows[1]]
            dense_vals[n] = t.to(storage_dtype).cpu().clone()
        touched = sorted({n for n, c in zip(pivots.names, pivots.counts()) if c} | set(dense_rows))
        snapshot = None
        if base is None:
            fp: dict[str, Any] = {}
            logger.warning(
                "Concept.capture: no base fingerprint given; the concept cannot check that it is applied to the right "
                "model, and applying it will need allow_unverified=True (pass base=snapshot_base(model, pivots, "
                "dense) or fingerprint_model(model) taken before tuning)"
            )
        elif isinstance(base, BaseSnapshot):
            fp, snapshot = base.fingerprint, base
        elif isinstance(base, Mapping) and "tensors" in base:
            fp = dict(base)
        elif isinstance(base, Mapping):
            fp = {"algorithm": "sha256", "tensors": {n: _fingerprint_entry(t) for n, t in base.items()}}
            snapshot = BaseSnapshot(fp, {n: (None, t.detach().reshape(-1).clone()) for n, t in base.items()})
        else:
            raise ConceptError(
                f"capture: base must be a BaseSnapshot, a fingerprint or a dict, got {type(base).__name__}"
            )
        if fp:
            have = fp.get("tensors", {})
            missing = [n for n in touched if n not in have]
            if missing:
                raise ConceptError(f"capture: the base fingerprint lacks touched tensors {missing[:3]}")
            fp = {"algorithm": fp.get("algorithm", "sha256"), "tensors": {n: have[n] for n in touched}}
        meta = {"ppt_fast_version": __version__, **dict(meta or {})}
        concept = cls(
            list(identifiers), dict(tokens or {}), pivots, values.to(storage_dtype), dense_vals, fp, meta, dense_rows
        )
        if snapshot is not None:
            concept._register_captured(lm, snapshot)
        return concept

    @classmethod
    def _capture_result(cls, result: Any, identifier: Any, *, storage_dtype: torch.dtype) -> Concept:
        """From a `ppt_fast.tuning.TuneResult`: one concept for `identifier`."""
        idents = list(result.identifiers)
        if identifier is None and len(idents) == 1:
            identifier = idents[0]
        if identifier not in idents:
            raise ConceptError(f"capture: identifier {identifier!r} is not one of the run's {idents}")
        base = getattr(result, "base_snapshot", None)
        if base is None:
            fp = getattr(result, "base_fingerprint", None)
            base = fp if isinstance(fp, Mapping) else None
        meta = dict(getattr(result, "settings", {}) or {})
        if isinstance(getattr(result, "base_fingerprint", None), str):
            meta.setdefault("base_model_sha256", result.base_fingerprint)
        if len(idents) > 1:
            meta.setdefault("trained_with", idents)
            meta.setdefault("joint_run", _joint_run_id(result, idents))
        dense = {n: (tuple(r) if r is not None else None) for n, r in (getattr(result, "dense_rows", {}) or {}).items()}
        return cls.capture(
            result.model,
            result.pivots[identifier],
            identifiers=[identifier],
            tokens={identifier: result.tokens[identifier]},
            dense=dense,
            base=base,
            meta=meta,
            storage_dtype=storage_dtype,
        )

    # ---- positions and tuned values per tensor ---------------------------------------------------------------------
    def _positions(self, name: str, device: torch.device | None) -> torch.Tensor:
        """Sorted int64 flat positions the concept touches in tensor `name`."""
        parts = []
        if name in self.pivots.names:
            parts.append(self.pivots.indices_of(name).to(torch.int64))
        if name in self.dense:
            lo, hi = self._dense_flat_range(name)
            parts.append(torch.arange(lo, hi, dtype=torch.int64))
        pos = torch.unique(torch.cat(parts), sorted=True) if len(parts) > 1 else parts[0]
        return pos if device is None else pos.to(device)

    def _dense_flat_range(self, name: str) -> tuple[int, int]:
        """[lo, hi) flat positions of the dense values of `name` (rows of the parameter are contiguous)."""
        t = self.dense[name]
        rows = self.dense_rows.get(name)
        if rows is None:
            return 0, t.numel()
        row = t[0].numel() if t.dim() and t.shape[0] else 1
        return rows[0] * row, rows[1] * row

    def _tuned(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted int64 positions, tuned fp32 values) of tensor `name`; dense values win over pivots."""
        pos_parts, val_parts = [], []
        if name in self.pivots.names:
            i = self.pivots.index(name)
            o = self.pivots.offsets_list
            pos_parts.append(self.pivots.indices_of(i).to(torch.int64))
            val_parts.append(self.values[o[i] : o[i + 1]].float())
        if name in self.dense:
            lo, hi = self._dense_flat_range(name)
            pos_parts.append(torch.arange(lo, hi, dtype=torch.int64))
            val_parts.append(self.dense[name].reshape(-1).float())
        if len(pos_parts) == 1:
            return pos_parts[0], val_parts[0]
        pos = torch.cat(pos_parts)
        vals = torch.cat(val_parts)
        # Stable sort: among equal positions the dense value (later) wins when we keep the last occurrence.
        order = torch.argsort(pos, stable=True)
        pos, vals = pos[order], vals[order]
        keep = torch.ones_like(pos, dtype=torch.bool)
        keep[:-1] = pos[1:] != pos[:-1]
        return pos[keep], vals[keep]

    # ---- fingerprint checks ----------------------------------------------------------------------------------------
    def check_model(self, model: Any, *, force: bool = False, _memo: dict | None = None) -> None:
        """Raise FingerprintMismatch unless `model`'s base values of the touched tensors match the fingerprint.

        Names, shapes and the dense row ranges must always fit (`force` cannot override them: the concept could not
        be written into the tensors). The sha256 of every touched tensor's base values (the current values with any
        applied concept's changes undone) must match the fingerprint; a model in another dtype is compared after
        rounding to bf16. With `force=True` a hash mismatch is logged as a warning instead.
        """
        lm = _resolve_lm(model)
        params = dict(lm.named_parameters())
        reg: _Registry | None = getattr(lm, REGISTRY_ATTR, None)
        problems = []
        for n in self.touched_names():
            p = params.get(n)
            if p is None:
                problems.append(f"{n!r} is not a parameter of the model")
                continue
            fp_shape = self.fingerprint.get("tensors", {}).get(n, {}).get("shape")
            shape = self.pivots.shapes[self.pivots.index(n)] if n in self.pivots.names else fp_shape
            if shape is not None and p.shape != torch.Size(shape):
                problems.append(f"{n!r} has shape {tuple(p.shape)}, the concept was tuned on {tuple(shape)}")
                continue
            if n in self.dense:
                t, rows = self.dense[n], self.dense_rows.get(n)
                fits = t.shape == p.shape if rows is None else (t.shape[1:] == p.shape[1:] and rows[1] <= p.shape[0])
                if not fits:
                    where = "the whole tensor" if rows is None else f"rows [{rows[0]}:{rows[1]}]"
                    problems.append(
                        f"{n!r} has shape {tuple(p.shape)}; the concept's dense values {tuple(t.shape)} "
                        f"for {where} do not fit"
                    )
        if problems:
            raise FingerprintMismatch(
                f"concept {self.identifiers} cannot be applied to this model: {'; '.join(problems[:3])}"
                f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}. It was tuned on another architecture "
                "(force=True does not override this); apply it to the base model it was tuned on"
            )
        for n in self.touched_names():
            if not params[n].is_contiguous():
                raise ConceptError(
                    f"parameter {n!r} is not contiguous; call .contiguous() on the model's tensors first"
                )
        fp = self.fingerprint.get("tensors", {})
        for n, entry in fp.items():
            if not isinstance(entry, Mapping) or entry.get("sha256") is None:
                continue
            p = params.get(n)
            if p is None:
                problems.append(f"{n!r} (in the fingerprint) is not a parameter of the model")
                continue
            dtype = str(p.dtype).replace("torch.", "")
            kind = "sha256" if dtype == entry.get("dtype") else "sha256_bf16"
            memo = {} if _memo is None else _memo
            if (n, kind) not in memo:
                base = reg.base_view(n, p) if reg is not None else p.detach()
                if kind == "sha256_bf16" and base.dtype != torch.bfloat16:
                    base = base.to(torch.bfloat16)
                memo[(n, kind)] = hashlib.sha256(_bytes_of(base)).hexdigest()
            ok = memo[(n, kind)] == entry.get(kind)
            if not ok:
                problems.append(
                    f"{n!r} ({dtype}) differs from the base the concept was tuned on ({entry.get('dtype')})"
                )
        if problems:
            msg = (
                f"concept {self.identifiers} does not match this model: {'; '.join(problems[:3])}"
                f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}. Apply it to the base model it was "
                "tuned on, or pass force=True to apply it anyway"
            )
            if not force:
                raise FingerprintMismatch(msg)
            logger.warning("force=True: %s", msg)
        elif not fp:
            logger.debug("concept %s has no base fingerprint; only names and shapes were checked", self.identifiers)

    # ---- apply / remove ----------------------------------------------------------------------------------------------
    def apply(self, model: Any, scale: float = 1.0, *, force: bool = False, allow_unverified: bool = False) -> None:
        """Apply the concept to `model` (an LM nn.Module or an object with `.lm`), in place.

        Touched entries become `base + scale * (tuned - base)` (fp32 from the base; exactly `tuned` at scale 1), the
        identifiers' tokens go into the LM's identifier bank (`lm._ppt_fast_identifier_bank`, when it has one; a
        warning otherwise). Refused (ConceptError) when one of the identifiers is already applied or registered, when
        `scale` is not finite or |scale| > MAX_SCALE, and when the concept has no base fingerprint for a tensor it
        touches unless `allow_unverified=True`; FingerprintMismatch when the model is not the concept's base
        (`force=True` applies anyway).
        """
        scales = [check_scale(scale)]
        _check_distinct([self])  # as compose checks it: `identifiers` is a plain attribute, it may have changed
        _apply_concepts([self], model, scales, force=force, allow_unverified=allow_unverified)

    def remove(self, model: Any) -> None:
        """Undo `apply`: every touched entry gets back its base value (bitwise) or, where other applied concepts
        touch it, the value those concepts give; the identifiers leave the bank."""
        lm = _resolve_lm(model)
        reg: _Registry | None = getattr(lm, REGISTRY_ATTR, None)
        if reg is None or self.key not in reg.applied:
            applied = [list(k) for k in reg.applied] if reg is not None else []
            raise ConceptError(f"concept {self.identifiers} is not applied to this model (applied: {applied})")
        reg.remove(lm, self.key)

    def _register_captured(self, lm: torch.nn.Module, snap: BaseSnapshot) -> None:
        """Mark the concept as applied (scale 1) on the tuned model `lm`, with the base values of `snap`."""
        reg = _Registry.of(lm)
        for ident in self.identifiers:
            owner = reg.owner_of(ident)
            if owner is not None:
                raise ConceptError(f"identifier {ident!r} is already applied to this model by concept {list(owner)}")
        params = dict(lm.named_parameters())
        for n in self.touched_names():
            if n not in snap.values:
                raise ConceptError(f"capture: the base snapshot has no values for {n!r}")
            idx, vals = snap.values[n]
            reg.save_base_values(n, params[n], idx, vals)
        bank = getattr(lm, BANK_ATTR, None)
        owned = [i for i in self.identifiers if bank is not None and bank.has(i)]
        reg.applied[self.key] = _Applied(self, 1.0, owned)

    # ---- save / load ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the concept file at `path` (atomic; see docs/concept_format.md)."""
        save_concepts([self], path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Concept:
        """Read a one-concept file. A bundle of several raises ConceptError: read it with `load_concepts`."""
        concepts = load_concepts(path)
        if len(concepts) != 1:
            raise ConceptError(
                f"{path} is a bundle of {len(concepts)} concepts "
                f"({[c.identifiers for c in concepts]}); read it with ppt_fast.concept.load_concepts"
            )
        return concepts[0]

    def equal(self, other: Concept) -> bool:
        """Bitwise the same concept (identifiers, tokens, pivots, values, dense values and rows)."""
        return (
            self.identifiers == other.identifiers
            and self.pivots.equal(other.pivots)
            and self.values.dtype == other.values.dtype
            and torch.equal(self.values, other.values)
            and self.tokens.keys() == other.tokens.keys()
            and all(torch.equal(self.tokens[k], other.tokens[k]) for k in self.tokens)
            and self.dense.keys() == other.dense.keys()
            and all(
                self.dense[k].dtype == other.dense[k].dtype and torch.equal(self.dense[k], other.dense[k])
                for k in self.dense
            )
            and self.dense_rows == other.dense_rows
            and self.fingerprint == other.fingerprint
        )


ConceptDelta = Concept


# ---------------------------------------------------------------------------------------------------------------------
# Several concepts in one file
# ---------------------------------------------------------------------------------------------------------------------
def _check_distinct(concepts: Sequence[Concept]) -> None:
    seen: dict[str, list[str]] = {}
    for c in concepts:
        if not isinstance(c, Concept):
            raise TypeError(f"expected Concept objects, got {type(c).__name__}")
        for ident in c.identifiers:
            if ident in seen:
                raise ConceptError(
                    f"two concepts use the identifier {ident!r} ({seen[ident]} and {c.identifiers}); identifiers must "
                    "be unique across concepts applied or saved together"
                )
            seen[ident] = c.identifiers


def save_concepts(concepts: Sequence[Concept], path: str | os.PathLike) -> None:
    """Write one file holding `concepts` (a bundle when several): safetensors + JSON header + sha256 checksum.

    Atomic: written to a temporary file in the same folder, fsynced, then `os.replace`d over `path`, so an existing
    file is never left half-written. Raises ConceptError naming the path when it cannot be written, and before
    writing anything when a concept holds a NaN or inf.
    """
    concepts = list(concepts)
    if not concepts:
        raise ConceptError("save_concepts: no concepts given")
    _check_distinct(concepts)
    for c in concepts:
        c.check_finite()
    _write_file(concepts, path)


def load_concepts(path: str | os.PathLike) -> list[Concept]:
    """Read every concept in a concept file (one, or a bundle) after checking its format version and checksum.

    Everything the file declares is checked before it is used, so a damaged or crafted file raises
    ConceptFileError (never another exception) and allocates no more than a small multiple of its own size: counts
    against the bytes that hold them, shapes against the tensors, indices against their tensors, every value
    finite. The checksum is an unkeyed sha256: it catches accidents, not forgery (docs/concept_format.md).
    """
    path = Path(path)
    where, header, tensors = _read_file(path)
    try:
        entries = _header_entries(header)
        used: set[str] = set()
        concepts = [Concept(*_decode_entry(e, tensors, f"c{i}.", used)) for i, e in enumerate(entries)]
        extra = sorted(set(tensors) - used)
        if extra:
            raise ConceptFileError(f"holds tensors its header does not describe: {extra[:3]}")
        _check_distinct(concepts)
    except ConceptError as e:
        # The decoder's own refusals say what is wrong; the fix is the same for all of them.
        fix = "; the file is damaged or not written by ppt_fast: write it again" if type(e) is ConceptFileError else ""
        raise ConceptFileError(f"{where}: {e}{fix}") from e
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as e:  # pragma: no cover
        # A safety net: the checks above are meant to leave nothing for it (tests/test_concept_fuzz.py checks that).
        raise ConceptFileError(f"{where}: malformed concept header ({type(e).__name__}: {e}); write it again") from e
    for c in concepts:
        c.source = str(path)
    return concepts



def describe_concept(c: Concept, path: str) -> list[str]:
    """What a concept holds, as the lines `ppt-fast concept info` prints (and the app shows): identifiers and file,
    library, base model, recipe and ratio, pivots per tensor, dense tensors, tokens, storage, fingerprint."""
    meta = c.meta
    piv = c.pivots
    lines = [f"{', '.join(c.identifiers)}: {path}"]
    ratio = f" at ratio {meta['ratio']:g}" if meta.get("ratio") else ""
    conv = f" (converted from {meta['converted_from']['host']})" if meta.get("converted_from") else ""
    lines.append(f"  library {meta.get('host', 'audiocraft')}{conv}; base model {meta.get('model', '?')}; "
                 f"recipe {meta.get('preset', '?')}{ratio}")  # fmt: skip
    lines.append(f"  {piv.count:,} pivots in {len(piv.names)} tensors; {len(c.dense)} dense tensor(s) "
                 f"({sum(t.numel() for t in c.dense.values()):,} entries); tokens "
                 + ", ".join(f"{k} {tuple(v.shape)}" for k, v in c.tokens.items()) + f"; storage {c.storage_dtype}"
                 .replace("torch.", ""))  # fmt: skip
    for n, k in zip(piv.names, piv.counts()):
        lines.append(f"    {n}: {k:,} pivots")
    for n, t in c.dense.items():
        rows = c.dense_rows.get(n)
        lines.append(f"    {n}: dense {'all' if rows is None else f'rows [{rows[0]}:{rows[1]}]'} {tuple(t.shape)}")
    missing = c.unverified_names()
    fp = f"missing for {len(missing)} tensor(s): apply needs --allow-unverified" if missing else "complete"
    lines.append(f"  fingerprint: {fp}")
    return lines
