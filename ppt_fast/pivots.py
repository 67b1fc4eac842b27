"""PivotSet: which entries of which tensors are pivotal, packed.

Layout (what every kernel reads):
- `names[i]`, `shapes[i]`: the i-th tensor the set covers, in a fixed order (the order scores were given in).
- `offsets`: int64, CPU, `[T + 1]`; tensor i owns `indices[offsets[i]:offsets[i + 1]]`. int64 because totals can pass
  2**31 (musicgen-large has 3.3 B parameters).
- `indices`: int32, `[k]`, on the scores' device: flat (row-major) indices into the *whole* tensor i, strictly
  increasing within a tensor. Local int32 indices are enough because no single tensor passes 2**31 entries.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ._io import atomic_write

_INT32_MAX = 2**31 - 1


class PivotError(ValueError):
    """A PivotSet (or raw pivot indices given to an op) that does not describe valid entries of its tensors."""


def check_indices(
    names: Sequence[str], numels: Sequence[int], offsets: Sequence[int], indices: torch.Tensor, who: str
) -> None:
    """Raise PivotError unless `offsets` start at 0, never decrease and end at len(indices), and every tensor's
    indices lie in [0, numel) and strictly increase. Vectorised: a few passes over the k indices, no Python loop
    over pivots. This is the one check every pivot list passes before a kernel may write through it."""
    if not offsets or offsets[0] != 0:
        raise PivotError(f"{who}: offsets must start at 0 (got {offsets[:1]}); use a PivotSet's offsets")
    bad = next((i for i in range(len(offsets) - 1) if offsets[i + 1] < offsets[i]), None)
    if bad is not None:
        raise PivotError(
            f"{who}: offsets decrease at tensor {names[bad]!r} ({offsets[bad]} -> {offsets[bad + 1]}); "
            "they must never decrease"
        )
    if offsets[-1] != indices.numel():
        raise PivotError(f"{who}: {indices.numel()} indices but offsets end at {offsets[-1]}; they must agree")
    k = indices.numel()
    if k == 0 or indices.device.type == "meta":  # meta tensors (shape-only planning) hold no values to check
        return
    idx = indices.to(torch.int64)
    counts = torch.tensor([offsets[i + 1] - offsets[i] for i in range(len(names))], dtype=torch.int64)
    tensor_of = torch.repeat_interleave(torch.arange(len(names)), counts).to(idx.device)
    limit = torch.tensor(list(numels), dtype=torch.int64).to(idx.device)[tensor_of]
    out_of_range = (idx < 0) | (idx >= limit)
    # Strictly increasing within a tensor: every step up except across a tensor boundary.
    starts = torch.zeros(k, dtype=torch.bool, device=idx.device)
    firsts = torch.tensor([o for o, c in zip(offsets[:-1], counts.tolist()) if c], dtype=torch.int64)
    starts[firsts.to(idx.device)] = True
    not_rising = torch.zeros(k, dtype=torch.bool, device=idx.device)
    not_rising[1:] = (idx[1:] <= idx[:-1]) & ~starts[1:]
    flags = torch.stack([out_of_range.any(), not_rising.any()]).tolist()
    if flags[0]:
        j = int(torch.nonzero(out_of_range)[0])
        t = int(tensor_of[j])
        raise PivotError(
            f"{who}: index {int(idx[j])} of tensor {names[t]!r} is outside [0, {numels[t]}) (its number of "
            "entries): the pivots were made for another tensor, or the file is corrupt"
        )
    if flags[1]:
        j = int(torch.nonzero(not_rising)[0])
        t = int(tensor_of[j])
        raise PivotError(
            f"{who}: the indices of tensor {names[t]!r} do not strictly increase ({int(idx[j - 1])} then "
            f"{int(idx[j])}): each tensor's pivots must be sorted and distinct"
        )


# Index tensors that passed check_indices, with what they were checked against. A kernel that gets one of these
# (same storage, same version counter, same offsets and tensor sizes) skips the per-index check: a PivotSet is
# checked once, not on every optimizer step. Any in-place change bumps the tensor's version and voids the mark.
_VALID: dict[int, tuple[weakref.ref, tuple]] = {}


def _stamp(indices: torch.Tensor, offsets: Sequence[int], numels: Sequence[int]) -> tuple:
    return (indices._version, indices.data_ptr(), indices.device, tuple(offsets), tuple(numels))


def mark_valid(indices: torch.Tensor, offsets: Sequence[int], numels: Sequence[int]) -> None:
    """Record that `indices` passed check_indices against these offsets and tensor sizes (until it is freed)."""
    key = id(indices)
    # Keyed by identity (a tensor's == is elementwise); the weakref's callback drops the entry when it dies.
    ref = weakref.ref(indices, lambda _r, key=key: _VALID.pop(key, None))
    _VALID[key] = (ref, _stamp(indices, offsets, numels))


def is_marked_valid(indices: torch.Tensor, offsets: Sequence[int], numels: Sequence[int]) -> bool:
    entry = _VALID.get(id(indices))
    return entry is not None and entry[0]() is indices and entry[1] == _stamp(indices, offsets, numels)


def ensure_checked(
    names: Callable[[], Sequence[str]], numels: Sequence[int], offsets: Sequence[int], indices: torch.Tensor, who: str
) -> None:
    """`check_indices` unless these very indices carry the mark of a check against the same offsets and sizes (the
    cheap path every optimizer step takes), then mark them. `names` is called only when a check runs."""
    if not is_marked_valid(indices, offsets, numels):
        check_indices(names(), numels, offsets, indices, who)
        mark_valid(indices, offsets, numels)


class PivotSet:
    """The pivots of a list of tensors: names, shapes, per-tensor offsets and packed int32 local indices."""

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        offsets: torch.Tensor | Sequence[int],
        indices: torch.Tensor,
    ) -> None:
        names = [str(n) for n in names]
        shapes = [torch.Size(s) for s in shapes]
        if len(names) != len(shapes):
            raise PivotError(f"PivotSet: {len(names)} names but {len(shapes)} shapes; give one name per tensor")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise PivotError(f"PivotSet: duplicate tensor names {dup}; names must be unique")
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 1:
            raise PivotError(
                f"PivotSet: indices must be a 1-D int32 tensor, got {getattr(indices, 'dtype', type(indices))} "
                f"with shape {tuple(getattr(indices, 'shape', ()))}"
            )
        offsets = torch.as_tensor(offsets, dtype=torch.int64, device="cpu").reshape(-1)
        if offsets.numel() != len(names) + 1:
            raise PivotError(
                f"PivotSet: offsets has {offsets.numel()} entries, expected len(names) + 1 = {len(names) + 1}"
            )
        for name, shape in zip(names, shapes):
            if any(d < 0 for d in shape):
                raise PivotError(f"PivotSet: tensor {name!r} has a negative dimension in its shape {tuple(shape)}")
            if shape.numel() - 1 > _INT32_MAX:
                raise PivotError(f"PivotSet: tensor {name!r} of shape {tuple(shape)} has more than 2**31 entries")
        offsets_list = offsets.tolist()
        check_indices(names, [s.numel() for s in shapes], offsets_list, indices, "PivotSet")
        self.names: list[str] = names
        self.shapes: list[torch.Size] = shapes
        self.offsets: torch.Tensor = offsets
        self.indices: torch.Tensor = indices
        self._offsets_list: list[int] = offsets_list
        mark_valid(indices, offsets_list, self.numels)

    def check(self) -> None:
        """Raise PivotError unless the indices are still the ones checked at construction (an in-place change of
        `indices` since then voids the mark and they are checked again)."""
        ensure_checked(lambda: self.names, self.numels, self._offsets_list, self.indices, "PivotSet")

    # ---- basic facts -------------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """k: the number of pivots over all tensors."""
        return self._offsets_list[-1]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @property
    def numels(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def total(self) -> int:
        """N: entries in all covered tensors."""
        return sum(self.numels)

    @property
    def offsets_list(self) -> list[int]:
        """`offsets` as Python ints (what the ops take)."""
        return list(self._offsets_list)

    def counts(self) -> list[int]:
        o = self._offsets_list
        return [o[i + 1] - o[i] for i in range(len(self.names))]

    def density(self) -> float:
        """k / N over all covered tensors."""
        total = self.total
        return self.count / total if total else 0.0

    def densities(self) -> dict[str, float]:
        """Per-tensor k_i / N_i."""
        return {n: (c / s.numel() if s.numel() else 0.0) for n, c, s in zip(self.names, self.counts(), self.shapes)}

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"PivotSet has no tensor named {name!r}") from None

    def indices_of(self, key: int | str) -> torch.Tensor:
        """The int32 local indices of tensor `key` (position or name); a view into `indices`."""
        i = self.index(key) if isinstance(key, str) else key
        return self.indices[self._offsets_list[i] : self._offsets_list[i + 1]]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, int32 local indices) for every tensor, empty ones included."""
        for i, name in enumerate(self.names):
            yield name, self.indices_of(i)

    def to(self, device: torch.device | str) -> PivotSet:
        return PivotSet(self.names, self.shapes, self.offsets, self.indices.to(device))

    # ---- masks -------------------------------------------------------------------------------------------------
    def to_masks(self) -> dict[str, torch.Tensor]:
        """Dense bool masks, one per tensor, shaped like the tensor (for tests and dense baselines)."""
        out = {}
        for i, name in enumerate(self.names):
            mask = torch.zeros(self.shapes[i].numel(), dtype=torch.bool, device=self.device)
            mask[self.indices_of(i).long()] = True
            out[name] = mask.view(self.shapes[i])
        return out

    @classmethod
    def from_masks(
        cls, masks: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], names: Sequence[str] | None = None
    ) -> PivotSet:
        """Build from dense boolean (or 0/1) masks; `masks` is a name->mask mapping or a list (names "0", "1", ...)."""
        if isinstance(masks, Mapping):
            names = list(masks.keys())
            tensors = list(masks.values())
        else:
            tensors = list(masks)
            names = list(names) if names is not None else [str(i) for i in range(len(tensors))]
        if not tensors:
            raise PivotError("PivotSet.from_masks: no masks given")
        device = tensors[0].device
        parts, offsets = [], [0]
        for name, m in zip(names, tensors):
            if m.device != device:
                raise ValueError(f"PivotSet.from_masks: mask {name!r} is on {m.device}, the first on {device}")
            idx = torch.nonzero(m.reshape(-1) != 0).reshape(-1).to(torch.int32)
            parts.append(idx)
            offsets.append(offsets[-1] + idx.numel())
        indices = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32, device=device)
        return cls(names, [m.shape for m in tensors], offsets, indices)

    @classmethod
    def empty(
        cls, names: Sequence[str], shapes: Sequence[Sequence[int]], device: torch.device | str = "cpu"
    ) -> PivotSet:
        return cls(names, shapes, [0] * (len(names) + 1), torch.empty(0, dtype=torch.int32, device=device))

    # ---- set algebra ---------------------------------------------------------------------------------------------
    def _keys(self) -> torch.Tensor:
        """int64 global keys (tensor base + local index), increasing: one number per pivot over all tensors."""
        bases = torch.tensor([0] + self.numels, dtype=torch.int64).cumsum(0)[:-1].to(self.device)
        per = torch.repeat_interleave(bases, torch.tensor(self.counts(), dtype=torch.int64).to(self.device))
        return per + self.indices.to(torch.int64)

    def _from_keys(self, keys: torch.Tensor) -> PivotSet:
        bounds = torch.tensor([0] + self.numels, dtype=torch.int64).cumsum(0)
        ends = torch.searchsorted(keys.cpu(), bounds, right=False)  # pivots with key < bound
        offsets = ends - ends[0]
        tensor_of = torch.repeat_interleave(torch.arange(len(self.names)), offsets[1:] - offsets[:-1]).to(keys.device)
        local = keys - bounds[:-1].to(keys.device)[tensor_of]
        return PivotSet(self.names, self.shapes, offsets, local.to(torch.int32))

    def _check_layout(self, other: PivotSet, op: str) -> None:
        if not isinstance(other, PivotSet):
            raise TypeError(f"PivotSet.{op}: expected a PivotSet, got {type(other).__name__}")
        if not self.same_layout(other):
            diff = [
                f"{a!r}{tuple(sa)} vs {b!r}{tuple(sb)}"
                for a, sa, b, sb in zip(self.names, self.shapes, other.names, other.shapes)
                if a != b or sa != sb
            ]
            raise ValueError(
                f"PivotSet.{op}: the sets cover different tensors ({len(self.names)} vs {len(other.names)} tensors"
                f"{'; first difference: ' + diff[0] if diff else ''}); both must list the same names and shapes in "
                "the same order (re-express one with PivotSet.relayout)"
            )
        if other.device != self.device:
            raise ValueError(f"PivotSet.{op}: sets on {self.device} and {other.device}; move one with .to()")

    def union(self, other: PivotSet) -> PivotSet:
        """Entries pivotal in either set (same layout required)."""
        self._check_layout(other, "union")
        return self._from_keys(torch.unique(torch.cat([self._keys(), other._keys()]), sorted=True))

    def intersection(self, other: PivotSet) -> PivotSet:
        """Entries pivotal in both sets (same layout required)."""
        self._check_layout(other, "intersection")
        a = self._keys()
        return self._from_keys(a[torch.isin(a, other._keys())])

    def difference(self, other: PivotSet) -> PivotSet:
        """Entries pivotal in this set and not in `other` (same layout required)."""
        self._check_layout(other, "difference")
        a = self._keys()
        return self._from_keys(a[~torch.isin(a, other._keys())])

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    def relayout(self, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> PivotSet:
        """The same pivots over another tensor list: tensors this set lacks get no pivots; a tensor of this set with
        pivots that the new layout lacks, or with another shape, is an error."""
        names = [str(n) for n in names]
        shapes = [torch.Size(s) for s in shapes]
        pos = {n: i for i, n in enumerate(self.names)}
        new_names = set(names)
        lost = [n for n, c in zip(self.names, self.counts()) if c and n not in new_names]
        if lost:
            raise ValueError(f"PivotSet.relayout: the new layout drops tensors that hold pivots: {lost[:3]}")
        parts, offsets = [], [0]
        for n, s in zip(names, shapes):
            if n in pos:
                if self.shapes[pos[n]] != s:
                    raise ValueError(f"PivotSet.relayout: {n!r} has shape {tuple(self.shapes[pos[n]])}, not {tuple(s)}")
                parts.append(self.indices_of(pos[n]))
            offsets.append(offsets[-1] + (parts[-1].numel() if n in pos else 0))
        idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32, device=self.device)
        return PivotSet(names, shapes, offsets, idx)

    # ---- save / load -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (``indices`` int32 [k], ``offsets`` int64 [T+1]) with the names and shapes as
        JSON metadata. The write is atomic: a temporary file in the same folder, then `os.replace`."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {
            "format": "ppt_fast.PivotSet/1",
            "layout": json.dumps({"names": self.names, "shapes": [list(s) for s in self.shapes]}),
        }
        tensors = {"indices": self.indices.detach().cpu().contiguous(), "offsets": self.offsets.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> PivotSet:
        """Read a file written by `save`; indices go to `device`. Everything is checked as the constructor checks
        it (offsets, every index in range, sorted): a crafted or corrupt file raises `PivotError` naming the
        tensor, before any kernel can see it."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "ppt_fast.PivotSet/1":
                    raise PivotError(f"{path} is not a PivotSet file (metadata format {meta.get('format')!r})")
                keys = set(f.keys())
                if keys != {"indices", "offsets"}:
                    raise PivotError(f"{path}: a PivotSet file holds 'indices' and 'offsets', this one {sorted(keys)}")
                indices = f.get_tensor("indices")
                offsets = f.get_tensor("offsets")
            layout = json.loads(meta.get("layout", "null"))
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise PivotError(f"{path} is not a readable PivotSet file: {e}") from None
        ok = (
            isinstance(layout, dict)
            and isinstance(layout.get("names"), list)
            and isinstance(layout.get("shapes"), list)
            and all(isinstance(n, str) for n in layout["names"])
            and all(isinstance(sh, list) and all(type(d) is int for d in sh) for sh in layout["shapes"])
        )
        if not ok:
            raise PivotError(f"{path}: its layout metadata is not a list of names and integer shapes")
        if offsets.dtype != torch.int64:
            raise PivotError(f"{path}: offsets are {offsets.dtype}, a PivotSet file stores int64")
        return cls(layout["names"], layout["shapes"], offsets, indices.to(device))

    # ---- comparison / display ----------------------------------------------------------------------------------
    def same_layout(self, other: PivotSet) -> bool:
        return self.names == other.names and self.shapes == other.shapes

    def equal(self, other: PivotSet) -> bool:
        """Same tensors and exactly the same pivots."""
        return (
            self.same_layout(other)
            and self._offsets_list == other._offsets_list
            and torch.equal(self.indices.cpu(), other.indices.cpu())
        )

    def __repr__(self) -> str:
        dens = self.density()
        pct = f"{100 * dens:.3g}%" if not math.isnan(dens) else "n/a"
        return (
            f"PivotSet({len(self.names)} tensors, {self.count} of {self.total} entries = {pct}, device={self.device})"
        )
