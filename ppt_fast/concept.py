"""Concept files: what a tune run learned, packed, checked, and applied to / removed from / combined on a base model.

A `Concept` holds
- `identifiers` and their `tokens` (`identifier -> [n_tokens, dim]` fp32 embeddings in the text conditioner's output
  space, installed into the LM's identifier bank on `apply`);
- `pivots` (a `PivotSet` over the LM's parameter names, flat int32 indices into the *whole* parameter) and `values`
  (`[k]`, the TUNED values at the pivots, in the order of `pivots.indices`; fp32, fp16 or bf16 storage);
- `dense` (`name -> tuned values` of tensors or row ranges trained densely; the rows in `dense_rows`);
- `fingerprint` of the base model (name, shape, dtype and sha256 of every tensor the concept touches) and `meta`.

Storing tuned values rather than differences is what makes apply / remove / reload bitwise with fp32 storage
(DESIGN §6). On `apply` the model's overwritten base values are kept on the LM (a registry attribute,
`lm._ppt_fast_concepts`), so `remove` restores every parameter bitwise whatever its dtype, and every entry touched
by several concepts is recomputed from its base value and all applied concepts in a canonical order (sorted by
identifiers):

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_bytes
from .pivots import PivotError, PivotSet

logger = logging.getLogger(__name__)

FORMAT = "ppt_fast.Concept"
FORMAT_VERSION = 1
REGISTRY_ATTR = "_ppt_fast_concepts"
BANK_ATTR = "_ppt_fast_identifier_bank"
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items()} | {torch.float64: "float64"}
# A tensor whose touched share passes this keeps a whole clone of its base (cheaper than indices + values).
_WHOLE_BASE_SHARE = 0.25
# |scale| above this is refused: the paper's strengths are 0..2; 10 already extrapolates the tuned change tenfold, and
# larger factors mostly push parameters out of the range the model was trained in (fp16 ones towards overflow).
MAX_SCALE = 10.0
# No tensor of a PivotSet passes 2**31 entries (int32 local indices); a file's shapes are held to the same bound.
_MAX_NUMEL = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------
class ConceptError(ValueError):
    """A concept cannot be built, written, read or applied; the message says why and what to do."""


class ConceptFileError(ConceptError):
    """A concept file is not readable: not a concept file, truncated, its checksum does not match (damaged), or what
    it declares does not hold (sizes, shapes, dtypes, indices, non-finite values: crafted or written by a bug)."""


class ConceptVersionError(ConceptError):
    """A concept file was written in a newer format than this ppt_fast reads."""


class FingerprintMismatch(ConceptError):
    """The model is not the base model the concept was tuned on (`force=True` overrides)."""


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: the LM, hashing, varint packing
# ---------------------------------------------------------------------------------------------------------------------
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


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def _tensor_hashes(t: torch.Tensor) -> dict[str, str]:
    """sha256 of the exact bytes, and of the values rounded to bf16 (matches a bf16 copy of an fp32 model)."""
    exact = hashlib.sha256(_bytes_of(t)).hexdigest()
    canon = t if t.dtype == torch.bfloat16 else t.detach().to(torch.bfloat16)
    return {"sha256": exact, "sha256_bf16": hashlib.sha256(_bytes_of(canon)).hexdigest()}


def _fingerprint_entry(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), **_tensor_hashes(t)}


def _varint_encode(values: torch.Tensor) -> torch.Tensor:
    """LEB128: 7 bits per byte, high bit set on every byte but a value's last. int64 [n] >= 0 -> uint8 [m]."""
    v = values.to(torch.int64).cpu()
    if v.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    if bool((v < 0).any()):
        raise ValueError("varint: negative value")
    nbytes = torch.ones_like(v)
    rest = v >> 7
    while bool((rest > 0).any()):
        nbytes += (rest > 0).to(torch.int64)
        rest >>= 7
    starts = torch.cumsum(nbytes, 0) - nbytes
    total = int(nbytes.sum())
    rep = torch.repeat_interleave(v, nbytes)
    j = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, nbytes)
    byte = (rep >> (7 * j)) & 0x7F
    last = j == torch.repeat_interleave(nbytes - 1, nbytes)
    byte = byte | ((~last).to(torch.int64) << 7)
    return byte.to(torch.uint8)


def _varint_decode(data: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `_varint_encode`: uint8 [m] -> int64 [count]; raises ConceptFileError on malformed input."""
    b = data.to(torch.int64).reshape(-1)
    if count == 0:
        if b.numel():
            raise ConceptFileError("index stream has bytes but no indices")
        return torch.empty(0, dtype=torch.int64)
    term = (b & 0x80) == 0
    if b.numel() == 0 or not bool(term[-1]) or int(term.sum()) != count:
        raise ConceptFileError(f"index stream is malformed (expected {count} varints in {b.numel()} bytes)")
    group = torch.cumsum(term.to(torch.int64), 0) - term.to(torch.int64)
    ends = torch.nonzero(term).reshape(-1)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1] + 1])
    j = torch.arange(b.numel(), dtype=torch.int64) - starts[group]
    if bool((j > 4).any()):
        raise ConceptFileError("index stream holds a gap wider than 2**35")
    out = torch.zeros(count, dtype=torch.int64)
    out.scatter_add_(0, group, (b & 0x7F) << (7 * j))
    return out


def _pack_indices(indices: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Per tensor: gaps between consecutive indices minus one (the first from -1), as varints."""
    idx = indices.to(torch.int64).cpu()
    prev = torch.cat([torch.full((1,), -1, dtype=torch.int64), idx[:-1]]) if idx.numel() else idx
    starts = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)[:-1]
    starts = starts[torch.tensor(counts, dtype=torch.int64) > 0]
    prev[starts] = -1
    return _varint_encode(idx - prev - 1)


def _unpack_indices(packed: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    k = int(sum(counts))
    if k == 0:
        if packed.numel():
            raise ConceptFileError("index stream has bytes but no indices")
        return torch.empty(0, dtype=torch.int64)
    steps = _varint_decode(packed, k) + 1
    cs = torch.cumsum(steps, 0)
    bounds = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    seg_base = torch.where(bounds[:-1] > 0, cs[(bounds[:-1] - 1).clamp_min(0)], torch.zeros_like(bounds[:-1]))
    per = torch.repeat_interleave(seg_base, torch.tensor(counts, dtype=torch.int64))
    return cs - per - 1


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ConceptError(f"storage dtype {dtype} is not one of float32, float16, bfloat16") from None


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
# Base snapshots (what tune() takes before training so the tuned model can later be restored and checked)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class BaseSnapshot:
    """The base model's fingerprint and its values at the entries a run will train (taken before training).

    `values[name]` is `(flat_idx int64 [n] | None, base values [n] or the whole flat tensor, in the param's dtype)`.
    """

    fingerprint: dict[str, Any]
    values: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)


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


# ---------------------------------------------------------------------------------------------------------------------
# The concept
# ---------------------------------------------------------------------------------------------------------------------
class Concept:
    """One learned concept: identifiers + token embeddings, tuned values at the pivots, dense tuned values, the base
    model's fingerprint and metadata. See the module docstring for the semantics of apply / remove / compose.

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
                `ppt_fast.musicgen.tune_model` with `pivots` = the identifier to capture.
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
        from . import __version__

        meta = {"ppt_fast_version": __version__, **dict(meta or {})}
        concept = cls(
            list(identifiers), dict(tokens or {}), pivots, values.to(storage_dtype), dense_vals, fp, meta, dense_rows
        )
        if snapshot is not None:
            concept._register_captured(lm, snapshot)
        return concept

    @classmethod
    def _capture_result(cls, result: Any, identifier: Any, *, storage_dtype: torch.dtype) -> Concept:
        """From a `ppt_fast.musicgen.tune.TuneResult`: one concept for `identifier`."""
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
        compose([self], model, scales=[scale], force=force, allow_unverified=allow_unverified)

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
# Several concepts
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
    for c in concepts:
        c.check_finite()  # the tensors are plain attributes: they may have been changed since construction
        if not allow_unverified:
            _check_verified(c)
    lm = _resolve_lm(model)
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


# ---------------------------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------------------------
def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _checksum(header: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the header JSON and every tensor (name, dtype, shape, bytes) in sorted-name order."""
    h = hashlib.sha256()
    h.update(header.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes_of(t))
    return "sha256:" + h.hexdigest()


def _encode(concepts: Sequence[Concept]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from . import __version__

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for ci, c in enumerate(concepts):
        p = c.pivots
        pre = f"c{ci}."
        tensors[pre + "pivots.gaps"] = _pack_indices(p.indices, p.counts())
        tensors[pre + "pivots.values"] = c.values
        dense = []
        for j, (n, t) in enumerate(sorted(c.dense.items())):
            tensors[f"{pre}dense.{j}"] = t
            rows = c.dense_rows.get(n)
            dense.append({"name": n, "shape": list(t.shape), "rows": list(rows) if rows is not None else None})
        tokens = []
        for j, ident in enumerate(c.identifiers):
            if ident in c.tokens:
                tensors[f"{pre}tokens.{j}"] = c.tokens[ident]
                tokens.append(ident)
        entries.append(
            {
                "identifiers": c.identifiers,
                "tokens": tokens,
                "pivots": {
                    "names": p.names,
                    "shapes": [list(s) for s in p.shapes],
                    "counts": p.counts(),
                    "encoding": "varint-gap",
                },
                "storage_dtype": _dtype_name(c.values.dtype),
                "dense": dense,
                "fingerprint": c.fingerprint,
                "meta": c.meta,
            }
        )
    header = _canonical_json({"concepts": entries})
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "ppt_fast_version": __version__,
        "header": header,
        "checksum": _checksum(header, tensors),
    }
    return meta, tensors


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
}


def _serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file, byte-deterministic (the library's writer orders the metadata by a randomised hash map):
    8-byte little-endian header length, the JSON header (sorted keys, space-padded to 8 bytes), the tensors'
    bytes in sorted-name order, contiguous."""
    head: dict[str, Any] = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        b = bytes(_bytes_of(t))
        head[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    js = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js + b"".join(blobs)


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
    meta, tensors = _encode(concepts)
    data = _serialize(tensors, meta)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise ConceptError(f"cannot write the concept file {str(path)!r}: {e}; choose a writable path") from e


def load_concepts(path: str | os.PathLike) -> list[Concept]:
    """Read every concept in a concept file (one, or a bundle) after checking its format version and checksum.

    Everything the file declares is checked before it is used, so a damaged or crafted file raises
    ConceptFileError (never another exception) and allocates no more than a small multiple of its own size: counts
    against the bytes that hold them, shapes against the tensors, indices against their tensors, every value
    finite. The checksum is an unkeyed sha256: it catches accidents, not forgery (docs/concept_format.md).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConceptError(f"cannot read the concept file {str(path)!r}: {e}") from e
    where = repr(str(path))
    tensors, meta = _read_safetensors(data, where)
    if meta.get("format") != FORMAT:
        raise ConceptFileError(f"{where} is not a concept file (format {meta.get('format')!r}, not {FORMAT!r})")
    version_text = meta.get("format_version", "")
    version = int(version_text) if version_text.isascii() and version_text.isdigit() and len(version_text) < 10 else 0
    if version < 1:
        raise ConceptFileError(f"{where}: format_version {version_text!r} is not a concept format version (1, 2, ...)")
    if version > FORMAT_VERSION:
        from . import __version__

        raise ConceptVersionError(
            f"{where} was written in concept format {version} (by ppt_fast {meta.get('ppt_fast_version')}); "
            f"this ppt_fast ({__version__}) reads format {FORMAT_VERSION} and older: upgrade ppt_fast"
        )
    header = meta.get("header", "")
    if _checksum(header, tensors) != meta.get("checksum"):
        raise ConceptFileError(
            f"{where}: checksum mismatch (the file was changed or damaged after it was written); write it again"
        )
    try:
        entries = _header_entries(header)
        used: set[str] = set()
        concepts = [_decode_entry(e, tensors, f"c{i}.", used) for i, e in enumerate(entries)]
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


def _read_safetensors(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the string metadata of a safetensors file in memory; ConceptFileError when it is not one."""
    from safetensors.torch import load

    fix = "truncated or not safetensors"
    if len(data) < 8:
        raise ConceptFileError(f"{where} is not a readable concept file ({fix}: {len(data)} bytes); write it again")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ConceptFileError(
            f"{where} is not a readable concept file ({fix}: its header claims {n} bytes, {len(data) - 8} follow); "
            "write it again"
        )
    try:
        head = json.loads(data[8 : 8 + n].decode("utf-8"))
        meta = head.get("__metadata__") or {} if isinstance(head, dict) else None
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("its metadata is not a map of strings")
        # The file's bytes are untrusted input to a third-party parser: whatever it raises means "not readable".
        tensors = load(data)
    except Exception as e:
        raise ConceptFileError(f"{where} is not a readable concept file ({fix}: {e}); write it again") from e
    return tensors, meta


def _refuse_constant(name: str) -> Any:
    raise ConceptFileError(f"the header holds the non-finite number {name} (no ppt_fast writes one)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ConceptFileError(f"the header holds the number {text[:20]}, which overflows a float")
    return value


def _header_entries(header: str) -> list[dict[str, Any]]:
    """The header's concept entries; strict JSON (no NaN / Infinity), an object with a non-empty `concepts` list."""
    try:
        obj = json.loads(header, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ConceptFileError("the header nests too deeply to be a concept header") from None
    except ValueError as e:  # JSONDecodeError, or an integer past Python's digit limit
        raise ConceptFileError(f"the header is not JSON this reader takes ({e})") from None
    entries = obj.get("concepts") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConceptFileError("the header lists no concepts (`concepts` must be a non-empty list)")
    return entries


def _field(d: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """`d[key]`, which must be of `kind` (bools never count as ints); ConceptFileError naming `what` otherwise."""
    if not isinstance(d, dict) or key not in d:
        raise ConceptFileError(f"{what}: missing `{key}`")
    v = d[key]
    if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)) or not isinstance(v, kind):
        raise ConceptFileError(f"{what}: `{key}` is {type(v).__name__}, not {getattr(kind, '__name__', kind)}")
    return v


def _ints(v: Any, what: str, lo: int = 0, hi: int = _MAX_NUMEL) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v):
        raise ConceptFileError(f"{what} must be a list of integers in [{lo}, {hi}], got {str(v)[:80]}")
    return v


def _strs(v: Any, what: str, unique: bool = True) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConceptFileError(f"{what} must be a list of strings, got {str(v)[:80]}")
    if unique and len(set(v)) != len(v):
        raise ConceptFileError(f"{what} repeats a name: {str(v)[:80]}")
    return v


def _shape(v: Any, what: str) -> torch.Size:
    dims = _ints(v, what)
    if len(dims) > 8 or math.prod(dims) > _MAX_NUMEL:
        raise ConceptFileError(f"{what} {str(v)[:80]} is not a parameter shape (at most 8 dims, < 2**31 entries)")
    return torch.Size(dims)


def _tensor(tensors: Mapping[str, torch.Tensor], name: str, used: set[str], dtypes: Sequence[torch.dtype],
            shape: Sequence[int] | None = None, dim: int | None = None) -> torch.Tensor:  # fmt: skip
    """The file's tensor `name`, of one of `dtypes` and the given shape (or number of dims)."""
    t = tensors.get(name)
    if t is None:
        raise ConceptFileError(f"tensor {name!r}, which the header describes, is missing")
    if t.dtype not in dtypes:
        raise ConceptFileError(f"tensor {name!r} is {t.dtype}, not {' or '.join(str(d) for d in dtypes)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ConceptFileError(f"tensor {name!r} has shape {tuple(t.shape)}, the header says {tuple(shape)}")
    if dim is not None and t.dim() != dim:
        raise ConceptFileError(f"tensor {name!r} has {t.dim()} dims, not {dim}")
    used.add(name)
    return t


def _fingerprint(fp: Any, what: str) -> dict[str, Any]:
    """A header's fingerprint: {} or {"algorithm": "sha256", "tensors": {name: {shape, dtype, sha256, ...}}}."""
    if fp is None or fp == {}:
        return {}
    if not isinstance(fp, dict) or fp.get("algorithm", "sha256") != "sha256" or not isinstance(fp.get("tensors"), dict):
        raise ConceptFileError(f"{what}: not a sha256 fingerprint ({str(fp)[:80]})")
    for name, entry in fp["tensors"].items():
        if not isinstance(entry, dict):
            raise ConceptFileError(f"{what} of {name!r} is {type(entry).__name__}, not an object")
        if "shape" in entry:
            _shape(entry["shape"], f"{what} of {name!r}: shape")
        for key in ("dtype", "sha256", "sha256_bf16"):
            v = entry.get(key)
            if v is not None and not isinstance(v, str):
                raise ConceptFileError(f"{what} of {name!r}: `{key}` is {type(v).__name__}, not a string")
    return fp


def _decode_entry(e: Any, tensors: Mapping[str, torch.Tensor], pre: str, used: set[str]) -> Concept:
    """One header entry + its tensors -> a Concept; every declared size is checked before it is used."""
    what = f"concept {pre[:-1]}"
    piv = _field(e, "pivots", dict, what)
    if piv.get("encoding") != "varint-gap":
        raise ConceptFileError(f"{what}: unknown pivot encoding {piv.get('encoding')!r} (ppt_fast writes varint-gap)")
    names = _strs(_field(piv, "names", list, what), f"{what}: pivots.names")
    shapes = [_shape(s, f"{what}: the shape of {n!r}") for n, s in zip(names, _field(piv, "shapes", list, what))]
    counts = _ints(_field(piv, "counts", list, what), f"{what}: pivots.counts")
    if not len(names) == len(shapes) == len(counts):
        raise ConceptFileError(f"{what}: {len(names)} pivot names, {len(shapes)} shapes, {len(counts)} counts")
    for n, s, k in zip(names, shapes, counts):
        if k > s.numel():
            raise ConceptFileError(f"{what}: {k} pivots in {n!r}, which has {s.numel()} entries")
    storage = _field(e, "storage_dtype", str, what)
    if storage not in _STORAGE_DTYPES:
        raise ConceptFileError(f"{what}: storage dtype {storage!r} is not one of {', '.join(_STORAGE_DTYPES)}")
    dtype = _STORAGE_DTYPES[storage]
    k = sum(counts)
    gaps = _tensor(tensors, pre + "pivots.gaps", used, (torch.uint8,), dim=1)
    # Every index costs at least one byte of the stream: the count is bounded by bytes in the file BEFORE decoding.
    if k > gaps.numel():
        raise ConceptFileError(f"{what}: the header counts {k} pivots, the index stream holds {gaps.numel()} bytes")
    values = _tensor(tensors, pre + "pivots.values", used, (dtype,), shape=(k,))
    idx = _unpack_indices(gaps, counts)
    bounds = [0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()]
    for i, s in enumerate(shapes):
        if counts[i] and int(idx[bounds[i + 1] - 1]) >= s.numel():
            raise ConceptFileError(f"pivot indices of {names[i]!r} pass its {s.numel()} entries")
    try:
        pivots = PivotSet(names, shapes, bounds, idx.to(torch.int32))
    except ValueError as err:  # PivotError: the PivotSet's own checks, naming the tensor
        raise ConceptFileError(f"{what}: {err}") from err
    dense, rows = {}, {}
    for j, d in enumerate(_field(e, "dense", list, what)):
        dw = f"{what}: dense[{j}]"
        n = _field(d, "name", str, dw)
        if n in dense:
            raise ConceptFileError(f"{dw}: {n!r} is listed twice")
        shape = _shape(_field(d, "shape", list, dw), f"{dw}: shape")
        if shape.numel() == 0:
            raise ConceptFileError(f"{dw}: the dense values of {n!r} are empty ({tuple(shape)})")
        r = _field(d, "rows", (list, type(None)), dw)
        if r is not None:
            r = tuple(_ints(r, f"{dw}: rows"))
            if len(r) != 2 or len(shape) == 0 or not r[0] < r[1] or r[1] - r[0] != shape[0]:
                raise ConceptFileError(f"{dw}: rows {list(r)} do not fit its shape {tuple(shape)} (need [lo, hi])")
        dense[n] = _tensor(tensors, f"{pre}dense.{j}", used, (dtype,), shape=shape)
        rows[n] = r
    idents = _strs(_field(e, "identifiers", list, what), f"{what}: identifiers")
    token_idents = _strs(_field(e, "tokens", list, what), f"{what}: tokens")
    tokens = {}
    for ident in token_idents:
        if ident not in idents:
            raise ConceptFileError(f"{what}: tokens for {ident!r}, which is not one of its identifiers {idents}")
        t = _tensor(tensors, f"{pre}tokens.{idents.index(ident)}", used, (torch.float32,), dim=2)
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise ConceptFileError(f"{what}: the token embeddings of {ident!r} are empty ({tuple(t.shape)})")
        tokens[ident] = t
    fp = _fingerprint(e.get("fingerprint"), f"{what}: fingerprint")
    for n, s in zip(names, shapes):
        fs = fp.get("tensors", {}).get(n, {}).get("shape")
        if fs is not None and torch.Size(fs) != s:
            raise ConceptFileError(f"{what}: {n!r} has shape {tuple(s)} in the pivots, {tuple(fs)} in the fingerprint")
    meta = e.get("meta") or {}
    if not isinstance(meta, dict):
        raise ConceptFileError(f"{what}: meta is {type(meta).__name__}, not an object")
    return Concept(idents, tokens, pivots, values, dense, fp, meta, rows)


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
    "fingerprint_model",
    "load_concepts",
    "overlap",
    "remove_all",
    "save_concepts",
    "snapshot_base",
]
