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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ._io import atomic_write

_INT32_MAX = 2**31 - 1


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
            raise ValueError(f"PivotSet: {len(names)} names but {len(shapes)} shapes; give one name per tensor")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"PivotSet: duplicate tensor names {dup}; names must be unique")
        offsets = torch.as_tensor(offsets, dtype=torch.int64, device="cpu").reshape(-1)
        if offsets.numel() != len(names) + 1:
            raise ValueError(
                f"PivotSet: offsets has {offsets.numel()} entries, expected len(names) + 1 = {len(names) + 1}"
            )
        if offsets[0].item() != 0 or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("PivotSet: offsets must start at 0 and never decrease")
        if indices.dtype != torch.int32 or indices.dim() != 1:
            raise ValueError(
                f"PivotSet: indices must be a 1-D int32 tensor, got {indices.dtype} with shape {tuple(indices.shape)}"
            )
        if indices.numel() != offsets[-1].item():
            raise ValueError(f"PivotSet: {indices.numel()} indices but offsets[-1] = {offsets[-1].item()}")
        for shape in shapes:
            if shape.numel() - 1 > _INT32_MAX:
                raise ValueError(f"PivotSet: a tensor of shape {tuple(shape)} has more than 2**31 entries")
        self.names: list[str] = names
        self.shapes: list[torch.Size] = shapes
        self.offsets: torch.Tensor = offsets
        self.indices: torch.Tensor = indices
        self._offsets_list: list[int] = offsets.tolist()

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
            raise ValueError("PivotSet.from_masks: no masks given")
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
        """Read a file written by `save`; indices go to `device`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "ppt_fast.PivotSet/1":
                raise ValueError(f"{path} is not a PivotSet file (metadata format {meta.get('format')!r})")
            layout = json.loads(meta["layout"])
            indices = f.get_tensor("indices")
            offsets = f.get_tensor("offsets")
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
