"""The concept file format, bytes <-> tensors (docs/concept_format.md): a safetensors container whose metadata holds
the format name and version, the concepts' header JSON and a sha256 checksum; pivot indices are varint-packed gaps.

Writing: `_encode` (concepts -> metadata + tensors), `_serialize` (-> byte-deterministic safetensors bytes),
`_write_file` (atomic). Reading: `_read_file` (bytes -> checked metadata, header and tensors: the format, its version
and the checksum), `_header_entries` and `_decode_entry` (one header entry -> the checked arguments of `Concept`).
Everything a file declares is checked before it is used, so a damaged or crafted file raises ConceptFileError and
allocates no more than a small multiple of its own size. `Concept` and the `save_concepts` / `load_concepts` entry
points live in `ppt_fast.concept.concept`; this module knows concepts only by their attributes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import atomic_write_bytes
from .._version import __version__
from ..pivots import PivotSet
from .errors import ConceptError, ConceptFileError, ConceptVersionError

if TYPE_CHECKING:
    from .concept import Concept

FORMAT = "ppt_fast.Concept"
FORMAT_VERSION = 1
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items()} | {torch.float64: "float64"}
# No tensor of a PivotSet passes 2**31 entries (int32 local indices); a file's shapes are held to the same bound.
_MAX_NUMEL = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------------------
# Tensor bytes, varint packing, dtypes
# ---------------------------------------------------------------------------------------------------------------------
def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


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


# ---------------------------------------------------------------------------------------------------------------------
# Writing
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


def _write_file(concepts: Sequence[Concept], path: str | os.PathLike) -> None:
    """Encode `concepts` (checked by the caller) and write them at `path` atomically; ConceptError naming the path
    when it cannot be written."""
    meta, tensors = _encode(concepts)
    data = _serialize(tensors, meta)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise ConceptError(f"cannot write the concept file {str(path)!r}: {e}; choose a writable path") from e


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------
def _read_file(path: Path) -> tuple[str, str, dict[str, torch.Tensor]]:
    """`(where, header, tensors)` of the concept file at `path`: its name for messages, its header JSON (not yet
    parsed) and its tensors, after checking that it is a safetensors file of this format, in a version this ppt_fast
    reads, whose checksum matches."""
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
        raise ConceptVersionError(
            f"{where} was written in concept format {version} (by ppt_fast {meta.get('ppt_fast_version')}); "
            f"this ppt_fast ({__version__}) reads format {FORMAT_VERSION} and older: upgrade ppt_fast"
        )
    header = meta.get("header", "")
    if _checksum(header, tensors) != meta.get("checksum"):
        raise ConceptFileError(
            f"{where}: checksum mismatch (the file was changed or damaged after it was written); write it again"
        )
    return where, header, tensors


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


def _fingerprint_field(fp: Any, what: str) -> dict[str, Any]:
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


def _decode_entry(e: Any, tensors: Mapping[str, torch.Tensor], pre: str, used: set[str]) -> tuple[Any, ...]:
    """One header entry + its tensors -> the arguments of `Concept(...)`, in order (identifiers, tokens, pivots,
    values, dense, fingerprint, meta, dense_rows); every declared size is checked before it is used."""
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
    fp = _fingerprint_field(e.get("fingerprint"), f"{what}: fingerprint")
    for n, s in zip(names, shapes):
        fs = fp.get("tensors", {}).get(n, {}).get("shape")
        if fs is not None and torch.Size(fs) != s:
            raise ConceptFileError(f"{what}: {n!r} has shape {tuple(s)} in the pivots, {tuple(fs)} in the fingerprint")
    meta = e.get("meta") or {}
    if not isinstance(meta, dict):
        raise ConceptFileError(f"{what}: meta is {type(meta).__name__}, not an object")
    return idents, tokens, pivots, values, dense, fp, meta, rows


