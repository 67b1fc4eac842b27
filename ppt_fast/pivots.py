"""PivotSet: which entries of which tensors are pivotal, packed.

Layout (what every kernel reads):
- `names[i]`, `shapes[i]`: the i-th tensor the set covers, in a fixed order (the order scores were given in).
- `offsets`: int64, CPU, `[T + 1]`; tensor i owns `indices[offsets[i]:offsets[i + 1]]`. int64 because totals can pass
  2**31 (musicgen-large has 3.3 B parameters).
- `indices`: int32, `[k]`, on the scores' device: flat (row-major) indices into the *whole* tensor i, strictly
  increasing within a tensor. Local int32 indices are enough because no single tensor passes 2**31 entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

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
