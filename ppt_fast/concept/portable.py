"""One concept, two libraries: the same MusicGen checkpoint loaded through audiocraft or through transformers.

audiocraft's `LMModel` and transformers' `MusicgenForConditionalGeneration` hold the same language model under other
names, and pack attention differently: audiocraft's `in_proj_weight` `[3d, d]` is transformers' `q_proj`, `k_proj`
and `v_proj` `[d, d]` stacked in that order (rows `[0:d]`, `[d:2d]`, `[2d:3d]`); the rest is renamed one to one:

    audiocraft (in `MusicGen.lm`)               transformers (in the model; L = decoder.model.decoder.layers)
    transformer.layers.{i}.self_attn.in_proj    L.{i}.self_attn.{q,k,v}_proj
    transformer.layers.{i}.cross_attention.in_proj   L.{i}.encoder_attn.{q,k,v}_proj
    ....{self_attn,cross_attention}.out_proj    L.{i}.{self_attn,encoder_attn}.out_proj
    ....linear1 / linear2                       L.{i}.fc1 / fc2
    ....norm1 / norm_cross / norm2              L.{i}.self_attn_layer_norm / encoder_attn_layer_norm / final_layer_norm
    out_norm                                    decoder.model.decoder.layer_norm
    emb.{k}                                     decoder.model.decoder.embed_tokens.{k}
    linears.{k}                                 decoder.lm_heads.{k}
    condition_provider.conditioners.description.output_proj   enc_to_dec_proj

(the map transformers' own `convert_musicgen_transformers.py` applies to audiocraft checkpoints). The identifier
tokens need no change: both hosts append them to the text condition after that projection, in the decoder's width.

`convert(concept, model)` rewrites a concept for `model` (the other library's copy of the checkpoint): pivots and
tuned values move to the new names and flat positions, dense rows are split or joined, and the base fingerprint is
**checked** before it is rewritten: every tensor the concept was fingerprinted on is rebuilt from `model`'s tensors
(q/k/v stacked back into `in_proj_weight`, or cut out of it) and its sha256 must match, so a concept is never
converted onto another checkpoint. The converted concept carries `model`'s own fingerprint, `meta["host"]` of its
library and `meta["converted_from"]`. `Concept.apply` converts on the fly when it is handed the other library's model
(`for_model`); `ppt-fast concept convert` writes the converted file.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..pivots import PivotSet
from .errors import ConceptError, FingerprintMismatch
from .fingerprint import REGISTRY_ATTR, _bytes_of, _fingerprint_entry, _resolve_lm

if TYPE_CHECKING:
    from .concept import Concept

logger = logging.getLogger(__name__)

AUDIOCRAFT, TRANSFORMERS = "audiocraft", "transformers"
_HF_LAYER = "decoder.model.decoder.layers."
_AC_LAYER = "transformer.layers."
#: Layer sub-module renames, audiocraft -> transformers (one to one).
_LAYER_RENAMES = {
    "self_attn.out_proj": "self_attn.out_proj", "cross_attention.out_proj": "encoder_attn.out_proj",
    "linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm", "norm_cross": "encoder_attn_layer_norm",
    "norm2": "final_layer_norm",
}  # fmt: skip
_LAYER_RENAMES_INVERSE = {v: k for k, v in _LAYER_RENAMES.items()}
_ATTN = {"self_attn": "self_attn", "cross_attention": "encoder_attn"}
_QKV = ("q_proj", "k_proj", "v_proj")
_TOP = [
    (r"out_norm\.(weight|bias)", r"decoder.model.decoder.layer_norm.\1"),
    (r"emb\.(\d+)\.weight", r"decoder.model.decoder.embed_tokens.\1.weight"),
    (r"linears\.(\d+)\.(weight|bias)", r"decoder.lm_heads.\1.\2"),
    (r"condition_provider\.conditioners\.description\.output_proj\.(weight|bias)", r"enc_to_dec_proj.\1"),
]
_TOP_INVERSE = [
    (r"decoder\.model\.decoder\.layer_norm\.(weight|bias)", r"out_norm.\1"),
    (r"decoder\.model\.decoder\.embed_tokens\.(\d+)\.weight", r"emb.\1.weight"),
    (r"decoder\.lm_heads\.(\d+)\.(weight|bias)", r"linears.\1.\2"),
    (r"enc_to_dec_proj\.(weight|bias)", r"condition_provider.conditioners.description.output_proj.\1"),
]


def layout_of_names(names) -> str | None:
    """Which library's names these are: "audiocraft", "transformers", or None (neither, or no LM tensor)."""
    names = list(names)
    if any(n.startswith(_HF_LAYER) or n.startswith("decoder.lm_heads.") or n.startswith("enc_to_dec_proj.")
           for n in names):  # fmt: skip
        return TRANSFORMERS
    if any(n.startswith(_AC_LAYER) or n.startswith(("linears.", "emb.", "out_norm.", "condition_provider."))
           for n in names):  # fmt: skip
        return AUDIOCRAFT
    return None


def to_transformers(name: str) -> list[str]:
    """The transformers names holding audiocraft tensor `name`, in row order (three for a packed `in_proj`)."""
    m = re.fullmatch(r"transformer\.layers\.(\d+)\.(self_attn|cross_attention)\.in_proj_(weight|bias)", name)
    if m:
        i, attn, kind = m.groups()
        return [f"{_HF_LAYER}{i}.{_ATTN[attn]}.{q}.{kind}" for q in _QKV]
    m = re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in _LAYER_RENAMES:
        return [f"{_HF_LAYER}{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"]
    for pat, rep in _TOP:
        if re.fullmatch(pat, name):
            return [re.sub(pat, rep, name)]
    raise ConceptError(f"{name!r} has no counterpart in transformers' MusicGen; this concept cannot be converted")


def to_audiocraft(name: str) -> tuple[str, int]:
    """The audiocraft tensor holding transformers tensor `name`, and which third of its rows (0 for a 1:1 name)."""
    m = re.fullmatch(re.escape(_HF_LAYER) + r"(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)", name)
    if m:
        i, attn, q, kind = m.groups()
        ac_attn = "self_attn" if attn == "self_attn" else "cross_attention"
        return f"{_AC_LAYER}{i}.{ac_attn}.in_proj_{kind}", "qkv".index(q)
    m = re.fullmatch(re.escape(_HF_LAYER) + r"(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in _LAYER_RENAMES_INVERSE:
        return f"{_AC_LAYER}{m.group(1)}.{_LAYER_RENAMES_INVERSE[m.group(2)]}.{m.group(3)}", 0
    for pat, rep in _TOP_INVERSE:
        if re.fullmatch(pat, name):
            return re.sub(pat, rep, name), 0
    raise ConceptError(f"{name!r} has no counterpart in audiocraft's MusicGen; this concept cannot be converted")


def convert(concept: Concept, model: Any, *, force: bool = False) -> Concept:
    """`concept` rewritten for `model`, the same checkpoint loaded through the other library (module docstring).

    FingerprintMismatch when `model` is not the checkpoint the concept was tuned on (its tensors, rebuilt in the
    concept's layout, do not hash to the concept's fingerprint), unless `force=True` (logged); ConceptError when a
    tensor the concept touches has no counterpart or a shape that does not fit.
    """
    lm = _resolve_lm(model)
    params = dict(lm.named_parameters())
    dst_layout = layout_of_names(params)
    src_layout = concept.meta.get("host") or layout_of_names(concept.touched_names())
    if dst_layout is None or src_layout not in (AUDIOCRAFT, TRANSFORMERS):
        raise ConceptError(
            f"concept {concept.identifiers} ({src_layout or 'unknown library'}) cannot be converted for a "
            f"{type(model).__name__}: conversion is between audiocraft's and transformers' MusicGen"
        )
    if src_layout == dst_layout:
        return concept
    reg = getattr(lm, REGISTRY_ATTR, None)

    def param(name: str) -> torch.nn.Parameter:
        if name not in params:
            raise ConceptError(
                f"concept {concept.identifiers} touches a tensor that is {name!r} in {dst_layout}, and this "
                f"{type(model).__name__} has no such parameter: it is another architecture"
            )
        return params[name]

    def base(name: str) -> torch.Tensor:  # the base values (a copy when applied concepts changed the tensor)
        p = param(name)
        return reg.base_view(name, p) if reg is not None else p.detach()

    # 1. map every touched / fingerprinted source tensor to (target name, target row offset) pieces
    fp_src = concept.fingerprint.get("tensors", {})
    src_names = sorted(set(concept.touched_names()) | set(fp_src))
    src_shapes = {}
    for n in src_names:
        if n in concept.pivots.names:
            src_shapes[n] = torch.Size(concept.pivots.shapes[concept.pivots.index(n)])
        elif n in fp_src and fp_src[n].get("shape") is not None:
            src_shapes[n] = torch.Size(fp_src[n]["shape"])
        else:
            raise ConceptError(f"concept {concept.identifiers}: no shape known for {n!r}; it cannot be converted")
    # each source tensor: [(target, target_row0, src_row0, rows)]
    plan: dict[str, list[tuple[str, int, int, int]]] = {}
    for n in src_names:
        shape = src_shapes[n]
        if src_layout == AUDIOCRAFT:
            targets = to_transformers(n)
            rows = shape[0] // len(targets)
            if rows * len(targets) != shape[0]:
                raise ConceptError(f"{n!r} has {shape[0]} rows, not {len(targets)} equal parts; it cannot be split")
            plan[n] = [(t, 0, j * rows, rows) for j, t in enumerate(targets)]
        else:
            t, third = to_audiocraft(n)
            plan[n] = [(t, third * shape[0], 0, shape[0])]
        for t, t0, _, rows in plan[n]:
            tp = param(t)  # the shape only: no copy of the base values
            packed = 3 if t.endswith(("in_proj_weight", "in_proj_bias")) else 1
            rows_t = rows if src_layout == AUDIOCRAFT else shape[0] * packed
            if tp.shape[1:] != shape[1:] or tp.shape[0] != rows_t or t0 + rows > tp.shape[0]:
                raise ConceptError(
                    f"{n!r} {tuple(shape)} does not fit {t!r} {tuple(tp.shape)}: the model is another architecture"
                )

    # 2. the fingerprint: every fingerprinted source tensor rebuilt from the model must hash as recorded
    problems = []
    for n, entry in fp_src.items():
        if not isinstance(entry, Mapping) or entry.get("sha256") is None:
            continue
        parts = [base(t)[t0 : t0 + rows] if src_layout == TRANSFORMERS else base(t) for t, t0, _, rows in plan[n]]
        rebuilt = torch.cat([p.reshape(-1, *p.shape[1:]) for p in parts], 0).contiguous()
        dtype = str(rebuilt.dtype).replace("torch.", "")
        kind = "sha256" if dtype == entry.get("dtype") else "sha256_bf16"
        t = rebuilt if kind == "sha256" or rebuilt.dtype == torch.bfloat16 else rebuilt.to(torch.bfloat16)
        if hashlib.sha256(_bytes_of(t)).hexdigest() != entry.get(kind):
            problems.append(f"{n!r} (as {', '.join(p[0] for p in plan[n])})")
    if problems:
        msg = (
            f"concept {concept.identifiers} was tuned on another checkpoint than this {dst_layout} model: "
            f"{'; '.join(problems[:3])}{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''} differ. "
            "Convert it for the same checkpoint loaded through the other library, or pass force=True"
        )
        if not force:
            raise FingerprintMismatch(msg)
        logger.warning("force=True: %s", msg)

    # 3. pivots and their tuned values
    per_target: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    offsets = concept.pivots.offsets_list
    values = concept.values
    for j, n in enumerate(concept.pivots.names):
        idx = concept.pivots.indices_of(n).to(torch.int64)
        vals = values[offsets[j] : offsets[j + 1]]
        row = src_shapes[n][1:].numel()
        for t, t0, s0, rows in plan[n]:
            keep = (idx >= s0 * row) & (idx < (s0 + rows) * row)
            if bool(keep.any()):
                per_target.setdefault(t, []).append((idx[keep] - s0 * row + t0 * row, vals[keep]))
    names, shapes, counts, idx_parts, val_parts = [], [], [0], [], []
    order_of = {n: i for i, n in enumerate(params)}  # the target model's own order, as a tune run lays pivots out
    for t in sorted(per_target, key=order_of.__getitem__):
        idx = torch.cat([p[0] for p in per_target[t]])
        vals = torch.cat([p[1] for p in per_target[t]])
        order = torch.argsort(idx)
        names.append(t)
        shapes.append(tuple(params[t].shape))
        counts.append(idx.numel())
        idx_parts.append(idx[order].to(torch.int32))
        val_parts.append(vals[order])
    pivots = PivotSet(names, shapes, torch.tensor(counts).cumsum(0),
                      torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.int32))  # fmt: skip
    new_values = torch.cat(val_parts) if val_parts else values.new_zeros(0)

    # 4. dense rows: cut (audiocraft -> transformers) or joined into one row range (transformers -> audiocraft),
    # rows between two joined pieces taking the model's base values (tuned = base there: nothing changes)
    dense_parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for n, tensor in concept.dense.items():
        lo, hi = concept.dense_rows.get(n) or (0, src_shapes[n][0])
        for t, t0, s0, rows in plan[n]:
            a, b = max(lo, s0), min(hi, s0 + rows)
            if a < b:
                dense_parts.setdefault(t, []).append((a - s0 + t0, tensor[a - lo : b - lo]))
    dense, dense_rows = {}, {}
    for t, parts in sorted(dense_parts.items(), key=lambda kv: order_of[kv[0]]):
        parts.sort(key=lambda p: p[0])
        lo, hi = parts[0][0], max(r0 + p.shape[0] for r0, p in parts)
        full = base(t)
        out = full[lo:hi].to(parts[0][1].dtype).clone()
        for r0, p in parts:
            out[r0 - lo : r0 - lo + p.shape[0]] = p
        dense[t] = out
        dense_rows[t] = None if (lo, hi) == (0, full.shape[0]) else (lo, hi)

    touched = sorted(set(pivots.names) | set(dense))
    meta = dict(concept.meta)
    meta["host"] = dst_layout
    meta["converted_from"] = {"host": src_layout, "fingerprint_checked": not problems}
    out = type(concept)(concept.identifiers, concept.tokens, pivots, new_values, dense=dense,
                  fingerprint={"algorithm": "sha256", "tensors": {t: _fingerprint_entry(base(t)) for t in touched}}
                  if fp_src else {}, meta=meta,
                  dense_rows=dense_rows)  # fmt: skip
    out.source = concept.source
    return out


def for_model(concept: Concept, lm: torch.nn.Module, *, force: bool = False) -> Concept:
    """`concept` as it applies to `lm`: itself when its tensors are `lm`'s, converted (`convert`) when `lm` is the
    other library's MusicGen and the concept's names are not among `lm`'s parameters."""
    names = concept.touched_names()
    if not names:
        return concept
    params = dict(lm.named_parameters())
    if all(n in params for n in names):
        return concept
    src, dst = layout_of_names(names), layout_of_names(params)
    if src is None or dst is None or src == dst:
        return concept  # check_model names what does not fit
    logger.info("concept %s was tuned through %s; converting it for this %s model", concept.identifiers, src, dst)
    return convert(concept, lm, force=force)
