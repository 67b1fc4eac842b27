"""Scopes: which parameters (and which rows of them) may hold pivots, and which rows a recipe trains densely.

A scope rule is one of
- a string ``"<name glob>"`` (the whole tensor) or ``"<name glob>[<row start>:<row end>]"`` (rows of dim 0).
  Globs are `fnmatch` patterns over `named_parameters()` names (``*`` also crosses dots).
  Row bounds are an integer, ``d``, ``<int>d`` (e.g. ``2d``), or empty (start 0 / end = all rows).
  **d is the tensor's second dimension** (``param.shape[1]``) for tensors with two or more dims, and its only
  dimension for 1-D tensors (so ``"*.in_proj_bias[2d:3d]"`` does not work: a bias ``[3d]`` has d = 3d; write the
  numbers instead). For MusicGen's packed attention weight ``in_proj_weight`` of shape ``[3d, d]`` the Q rows are
  ``[0:d]``, K ``[d:2d]``, V ``[2d:3d]``.
  A row of a tensor with shape ``[R, C1, C2, ...]`` holds ``C1*C2*...`` entries; a 1-D tensor's rows are its entries;
  a 0-D tensor has one row.
- a callable ``(name, param) -> slice | (start, end) | True | None``: rows of dim 0, True = the whole tensor,
  None / False = not in scope.

Several rules may match one tensor: the **first** matching rule wins.

`Scope(sparse, dense=())` holds two rule lists: ``sparse`` says where pivots may be chosen (what
`SensitivityAccumulator` scores), ``dense`` says which rows a recipe trains in full (every entry of those rows is a
pivot; `Scope.dense_pivots` builds that PivotSet so it can be unioned with the selected one).

Presets (for audiocraft's `LMModel` names such as ``transformer.layers.3.self_attn.in_proj_weight``):

==============  ==========================================================  =========================================
preset          sparse (pivots selected here)                               dense (trained in full)
==============  ==========================================================  =========================================
``ppt``         ``*.self_attn.in_proj_weight[2d:3d]`` (self-attn V) and     none
                ``*.cross_attention.in_proj_weight[d:3d]`` (cross-attn K,V)
``dreamstyler`` ``*.self_attn.in_proj_weight[2d:3d]`` (self-attn V)         ``*.cross_attention.in_proj_weight[d:3d]``
``all-linear``  every 2-D tensor whose name ends in ``weight``, except      none
                embeddings (names matching ``emb.*``, ``*.emb.*``,
                ``*embed*``): in_proj, out_proj, linear1/2, linears.*,
                the conditioner's output_proj
``all``         every parameter                                             none
==============  ==========================================================  =========================================

(The preset globs are written ``*.self_attn*.in_proj_weight`` so that they also match audiocraft's non-custom
attention, which nests the weight as ``self_attn.mha.in_proj_weight``; MusicGen's own configs use the custom one.)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from .pivots import PivotSet

RowSlice = slice | tuple[int, int] | bool | None
RuleFn = Callable[[str, torch.Tensor], RowSlice]
ScopeSpec = Union["Scope", str, Sequence[str | RuleFn], RuleFn]  # noqa: UP007 (forward reference)

_RULE_RE = re.compile(r"^(?P<glob>[^\[\]]+)(?:\[(?P<start>[^:\]]*):(?P<end>[^:\]]*)\])?$")
_BOUND_RE = re.compile(r"^\s*(?:(?P<int>\d+)|(?P<mul>\d*)\s*\*?\s*d)\s*$")
_EMBED_GLOBS = ("emb.*", "*.emb.*", "*embed*")


class ScopeError(ValueError):
    """A scope that cannot be parsed or does not fit the model; the message says what to change."""


def model_dim(param: torch.Tensor) -> int:
    """The `d` of row bounds: shape[1] for tensors with >= 2 dims, shape[0] for 1-D tensors (1 for 0-D)."""
    if param.dim() >= 2:
        return int(param.shape[1])
    return int(param.shape[0]) if param.dim() == 1 else 1


def num_rows(param: torch.Tensor) -> int:
    return int(param.shape[0]) if param.dim() >= 1 else 1


def row_numel(param: torch.Tensor) -> int:
    """Entries per row of dim 0."""
    n = 1
    for s in param.shape[1:]:
        n *= int(s)
    return n


def _parse_bound(text: str, d: int, default: int, rule: str) -> int:
    text = text.strip()
    if not text:
        return default
    m = _BOUND_RE.match(text)
    if m is None:
        raise ScopeError(f"scope rule {rule!r}: row bound {text!r} is not an integer, 'd' or '<int>d' (e.g. '2d')")
    if m.group("int") is not None:
        return int(m.group("int"))
    mul = m.group("mul")
    return (int(mul) if mul else 1) * d


@dataclass(frozen=True)
class ScopeEntry:
    """One in-scope tensor: its name, the parameter, and the rows ``[start, end)`` of dim 0 that are in scope."""

    name: str
    param: torch.Tensor
    rows: tuple[int, int]

    @property
    def row_numel(self) -> int:
        return row_numel(self.param)

    @property
    def flat_range(self) -> tuple[int, int]:
        """``[lo, hi)`` in the whole parameter's flat (row-major) index space."""
        r = self.row_numel
        return self.rows[0] * r, self.rows[1] * r

    @property
    def numel(self) -> int:
        lo, hi = self.flat_range
        return hi - lo

    @property
    def slice_shape(self) -> torch.Size:
        """Shape of the in-scope row slice (what a score buffer for it looks like)."""
        if self.param.dim() == 0:
            return torch.Size([1]) if self.rows == (0, 1) else torch.Size([0])
        return torch.Size([self.rows[1] - self.rows[0], *self.param.shape[1:]])

    @property
    def whole(self) -> bool:
        return self.rows == (0, num_rows(self.param))

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The in-scope rows of `t` (a tensor shaped like the parameter, e.g. its gradient)."""
        if t.dim() == 0:
            return t.reshape(1)[self.rows[0] : self.rows[1]]
        return t[self.rows[0] : self.rows[1]]


class _Rule:
    def __init__(self, spec: str | RuleFn) -> None:
        self.spec = spec
        if callable(spec):
            self.fn: RuleFn | None = spec
            self.glob = None
            return
        if not isinstance(spec, str):
            raise ScopeError(f"a scope rule must be a string or a callable (name, param) -> rows, got {spec!r}")
        m = _RULE_RE.match(spec.strip())
        if m is None:
            raise ScopeError(
                f"scope rule {spec!r} is not '<name glob>' or '<name glob>[<start>:<end>]' "
                "(e.g. '*.self_attn.in_proj_weight[2d:3d]')"
            )
        self.fn = None
        self.glob = m.group("glob").strip()
        self.bounds = None if m.group("start") is None else (m.group("start"), m.group("end"))
        if self.bounds is not None:  # validate the syntax now with a dummy d
            _parse_bound(self.bounds[0], 1, 0, spec)
            _parse_bound(self.bounds[1], 1, 0, spec)

    def rows(self, name: str, param: torch.Tensor) -> tuple[int, int] | None:
        n_rows = num_rows(param)
        if self.fn is not None:
            out = self.fn(name, param)
            if out is None or out is False:
                return None
            if out is True:
                return (0, n_rows)
            if isinstance(out, slice):
                if out.step not in (None, 1):
                    raise ScopeError(f"scope callable returned {out} for {name!r}: only step-1 row slices are allowed")
                start, stop, _ = out.indices(n_rows)
                return self._check(name, param, start, stop, clamp_ok=True)
            if isinstance(out, tuple) and len(out) == 2:
                return self._check(name, param, int(out[0]), int(out[1]))
            raise ScopeError(
                f"scope callable returned {out!r} for {name!r}; return a slice, (start, end), True or None"
            )
        if not fnmatch.fnmatchcase(name, self.glob):
            return None
        if self.bounds is None:
            return (0, n_rows)
        d = model_dim(param)
        start = _parse_bound(self.bounds[0], d, 0, self.spec)
        end = _parse_bound(self.bounds[1], d, n_rows, self.spec)
        return self._check(name, param, start, end)

    def _check(self, name: str, param: torch.Tensor, start: int, end: int, clamp_ok: bool = False) -> tuple[int, int]:
        n_rows = num_rows(param)
        if not 0 <= start <= end <= n_rows:
            raise ScopeError(
                f"scope rule {self.spec!r} gives rows [{start}:{end}] of {name!r} (shape {tuple(param.shape)}, "
                f"{n_rows} rows, d = {model_dim(param)}); bounds must satisfy 0 <= start <= end <= {n_rows}"
            )
        return (start, end)

    def __repr__(self) -> str:
        return repr(self.spec) if not callable(self.spec) else getattr(self.spec, "__name__", "<callable>")


def _all_linear(name: str, param: torch.Tensor) -> bool | None:
    if param.dim() != 2 or not name.endswith("weight"):
        return None
    if any(fnmatch.fnmatchcase(name, g) for g in _EMBED_GLOBS):
        return None
    return True


def _everything(name: str, param: torch.Tensor) -> bool:
    return True


_all_linear.__name__ = "all-linear"
_everything.__name__ = "all"

PRESETS: dict[str, tuple[tuple[str | RuleFn, ...], tuple[str | RuleFn, ...]]] = {
    "ppt": (("*.self_attn*.in_proj_weight[2d:3d]", "*.cross_attention*.in_proj_weight[d:3d]"), ()),
    "dreamstyler": (("*.self_attn*.in_proj_weight[2d:3d]",), ("*.cross_attention*.in_proj_weight[d:3d]",)),
    "all-linear": ((_all_linear,), ()),
    "all": ((_everything,), ()),
}


def _named(model_or_named: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_named, torch.nn.Module):
        return list(model_or_named.named_parameters())
    if isinstance(model_or_named, dict):
        return list(model_or_named.items())
    items = list(model_or_named)
    for it in items:
        if not (isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) and isinstance(it[1], torch.Tensor)):
            raise TypeError(
                "expected an nn.Module, a name -> tensor dict or a list of (name, tensor) pairs; "
                f"got an item {type(it).__name__}"
            )
    return items


class Scope:
    """Where pivots may be (``sparse`` rules) and which rows are trained in full (``dense`` rules).

    Build with `Scope.of(spec)` from a preset name, a list of rule strings / callables, a single callable, or a
    Scope; or directly ``Scope(sparse=[...], dense=[...])``. See the module docstring for the rule syntax and presets.
    """

    def __init__(self, sparse: Iterable[str | RuleFn] = (), dense: Iterable[str | RuleFn] = (), name: str = "") -> None:
        if isinstance(sparse, str) or callable(sparse):
            sparse = [sparse]
        if isinstance(dense, str) or callable(dense):
            dense = [dense]
        self.sparse_rules = [_Rule(s) for s in sparse]
        self.dense_rules = [_Rule(s) for s in dense]
        self.name = name

    @property
    def sparse(self) -> tuple[str | RuleFn, ...]:
        """The rules (strings / callables) of where pivots may be chosen."""
        return tuple(r.spec for r in self.sparse_rules)

    @property
    def dense(self) -> tuple[str | RuleFn, ...]:
        """The rules (strings / callables) of the rows a recipe trains in full (empty for most presets)."""
        return tuple(r.spec for r in self.dense_rules)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> Scope:
        if name not in PRESETS:
            raise ScopeError(f"unknown scope preset {name!r}; choose one of {', '.join(PRESETS)} or give rule strings")
        sparse, dense = PRESETS[name]
        return cls(sparse, dense, name=name)

    @classmethod
    def of(cls, spec: ScopeSpec) -> Scope:
        """Coerce a preset name, a rule string list, a callable or a Scope into a Scope."""
        if isinstance(spec, Scope):
            return spec
        if isinstance(spec, str):
            if spec in PRESETS:
                return cls.preset(spec)
            if "*" in spec or "[" in spec or "." in spec or "?" in spec:
                return cls([spec])
            raise ScopeError(f"unknown scope preset {spec!r}; choose one of {', '.join(PRESETS)} or give rule strings")
        if callable(spec):
            return cls([spec])
        if spec is None:
            raise ScopeError(f"scope is None; give a preset ({', '.join(PRESETS)}), rule strings or a callable")
        return cls(list(spec))

    # ---- resolution --------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve(rules: list[_Rule], model_or_named: Any) -> list[ScopeEntry]:
        out = []
        seen: set[int] = set()
        for name, p in _named(model_or_named):
            if id(p) in seen:  # tied parameters appear once (named_parameters already dedups)
                continue
            for rule in rules:
                rows = rule.rows(name, p)
                if rows is not None:
                    if rows[1] > rows[0]:
                        out.append(ScopeEntry(name, p, rows))
                        seen.add(id(p))
                    break
        return out

    def resolve(self, model_or_named: Any) -> list[ScopeEntry]:
        """In-scope tensors for pivots (``sparse`` rules), in `named_parameters()` order; empty row ranges dropped."""
        return self._resolve(self.sparse_rules, model_or_named)

    def resolve_dense(self, model_or_named: Any) -> list[ScopeEntry]:
        """The rows trained in full (``dense`` rules)."""
        return self._resolve(self.dense_rules, model_or_named)

    def numel(self, model_or_named: Any) -> int:
        """N: entries in the sparse scope (what a density ratio is relative to)."""
        return sum(e.numel for e in self.resolve(model_or_named))

    def dense_pivots(self, model_or_named: Any, layout: Sequence[tuple[str, torch.Size]] | None = None) -> PivotSet:
        """Every entry of the dense rows as a PivotSet over `layout` (default: the dense tensors themselves).

        Give `layout` (``[(name, shape), ...]``, e.g. ``list(zip(ps.names, ps.shapes))``) to get a set that can be
        unioned with a selected PivotSet: a dense tensor not in the layout is an error.
        """
        entries = self.resolve_dense(model_or_named)
        if layout is None:
            layout = [(e.name, e.param.shape) for e in entries]
        names = [n for n, _ in layout]
        pos = {n: i for i, n in enumerate(names)}
        device = entries[0].param.device if entries else torch.device("cpu")
        ranges: dict[int, tuple[int, int]] = {}
        for e in entries:
            if e.name not in pos:
                raise ScopeError(f"dense tensor {e.name!r} is not in the given layout; add it to the layout")
            ranges[pos[e.name]] = e.flat_range
        parts, offsets = [], [0]
        for i in range(len(names)):
            lo, hi = ranges.get(i, (0, 0))
            parts.append(torch.arange(lo, hi, dtype=torch.int32, device=device))
            offsets.append(offsets[-1] + hi - lo)
        idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32, device=device)
        return PivotSet(names, [s for _, s in layout], offsets, idx)

    def __repr__(self) -> str:
        if self.name:
            return f"Scope.preset({self.name!r})"
        return f"Scope(sparse={self.sparse_rules!r}, dense={self.dense_rules!r})"
