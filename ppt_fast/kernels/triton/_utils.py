"""Shared pieces of the Triton launchers: pointer tables, block tables, dtype codes, launch options.

Every op here launches ONE kernel for all of its tensors (per dtype group): the kernel reads an int64 table of
`data_ptr()`s and casts the entry it needs to a typed pointer, and a block table `(tensor id, start)` tells each
program which tile of which tensor it owns, so no program straddles two tensors. Both tables are cached: the same
tensors (parameters, score buffers, a PivotSet) come back every step, and rebuilding a table costs a host-to-device
copy. A cache entry is keyed by exactly what it contains (the pointers, the sizes), so it can never be stale; the
LRU bound only caps memory.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch

# dtype codes passed to kernels as constexprs (one compiled variant per dtype combination).
FP32, FP16, BF16 = 0, 1, 2
DTYPE_CODE: dict[torch.dtype, int] = {torch.float32: FP32, torch.float16: FP16, torch.bfloat16: BF16}

# Torch's allocator hands out 512-byte aligned blocks, but a tensor may be a view at any element offset into one
# (e.g. parameters carved out of a flat buffer). 16 bytes is what a 128-bit vector load needs.
_VECTOR_ALIGN = 16

# Entries are a few bytes of device memory each. Large enough that hook-driven use (one call per tensor, ~600 tensors
# per step) keeps every tensor's tables cached instead of rebuilding them each call.
_CACHE_SIZE = 4096


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (read once per process by `triton.jit`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dtype_code(t: torch.Tensor, arg: str) -> int:
    try:
        return DTYPE_CODE[t.dtype]
    except KeyError:
        raise TypeError(f"{arg} has dtype {t.dtype}; the Triton kernels take float32, float16 or bfloat16") from None


def check_tile(tile: int, arg: str = "tile") -> int:
    """Tile sizes feed `tl.arange`, which needs a power of 2."""
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"{arg}={tile} must be a power of 2 >= 16")
    return tile


def gpu_options(**opts) -> dict:
    """Launch options that only mean something to a compiled kernel; the interpreter gets none of them."""
    return {} if interpreting() else opts


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Triton launches on the *current* CUDA device: make it the tensors' device for the launch."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def check_launchable(device: torch.device) -> None:
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "the Triton kernels got CPU tensors but TRITON_INTERPRET is not 1; move the tensors to a GPU, set "
            "TRITON_INTERPRET=1 before importing ppt_fast's kernels, or use another backend"
        )


_all_caches: list[LRU] = []


class LRU:
    """A small least-recently-used map from a key to a table built on a miss."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        _all_caches.append(self)

    def get(self, key: Hashable, build: Callable[[], object]):
        try:
            self._items.move_to_end(key)
            return self._items[key]
        except KeyError:
            value = build()
            self._items[key] = value
            if len(self._items) > self._size:
                self._items.popitem(last=False)
            return value

    def clear(self) -> None:
        self._items.clear()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table onto the device without a host sync: a pageable host-to-device copy waits for the stream
    (which would stall every step whose pointers changed), a pinned one is queued like a kernel."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_pointer_tables = LRU()
_block_tables = LRU()
_small_tables = LRU()


def clear_caches() -> None:
    """Drop every cached table (tests; or to release the few KB they hold on the device)."""
    for cache in _all_caches:
        cache.clear()


def pointer_table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 `[T]` table of the tensors' data pointers, on `device` (cached by the pointers themselves)."""
    ptrs = tuple(t.data_ptr() for t in tensors)
    key = (device, ptrs)
    return _pointer_tables.get(key, lambda: to_device(torch.tensor(ptrs, dtype=torch.int64), device))


def int64_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small cached int64 tensor (per-tensor sizes, offsets)."""
    values = tuple(int(v) for v in values)
    return _small_tables.get((device, values), lambda: to_device(torch.tensor(values, dtype=torch.int64), device))


def aligned(tensors: Sequence[torch.Tensor]) -> bool:
    """Every base pointer 16-byte aligned, so a kernel may promise the compiler vector loads on full tiles."""
    return all(t.data_ptr() % _VECTOR_ALIGN == 0 for t in tensors)


def block_table(
    lengths: Sequence[int], members: Sequence[int], tile: int, device: torch.device, base: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of `tile` entries over the tensors listed in `members` (ids into `lengths`), in member order.

    Returns `(tid int32 [B], start int64 [B])`: tile b covers entries `[start, min(start + tile, end))` of tensor
    `tid[b]`, where the range of tensor i is `[base[i], base[i] + lengths[i])` (base defaults to 0: local indices).
    Tensors of length 0 get no tile. Cached by its arguments.
    """
    lengths = tuple(int(n) for n in lengths)
    members = tuple(int(i) for i in members)
    base = tuple(int(b) for b in base) if base is not None else None
    key = (device, lengths, members, tile, base)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(members, dtype=torch.int64)
        n = torch.tensor([lengths[i] for i in members], dtype=torch.int64)
        tiles = (n + tile - 1) // tile
        total = int(tiles.sum())
        tid = torch.repeat_interleave(ids, tiles)
        first = torch.cumsum(tiles, 0) - tiles  # exclusive scan: index of each member's first tile
        start = (torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(first, tiles)) * tile
        if base is not None:
            start += torch.tensor(base, dtype=torch.int64)[tid]
        return to_device(tid.to(torch.int32), device), to_device(start, device)

    return _block_tables.get(key, build)
