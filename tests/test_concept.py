"""Concept files: packing, save/load, apply/remove exactness, fingerprints, and every bad input (ppt_fast.concept)."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
from _concept_cases import TinyBank, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)
from safetensors.torch import load, save

from ppt_fast import PivotSet, _io
from ppt_fast import concept as C
from ppt_fast.concept import (
    Concept,
    ConceptError,
    ConceptFileError,
    ConceptVersionError,
    FingerprintMismatch,
    fingerprint_model,
    load_concepts,
    save_concepts,
    snapshot_base,
)
from ppt_fast.concept import format as F

# Storage rounding: values are stored as tuned_fp32.to(dtype) (one rounding to nearest). The bound is that half-ulp,
# relative: fp16 has 10 mantissa bits (2**-11), bf16 7 (2**-8). Values here are ~N(0, 1), far from fp16's subnormals.
STORAGE_RTOL = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}



class Net(torch.nn.Module):
    """A small LM stand-in: a packed in_proj-like weight [3d, d] (row ranges matter), a bias, a head."""

    def __init__(self, d: int = 12, out: int = 7) -> None:
        super().__init__()
        self.in_proj_weight = torch.nn.Parameter(torch.randn(3 * d, d))
        self.in_proj_bias = torch.nn.Parameter(torch.randn(3 * d))
        self.head = torch.nn.Linear(3 * d, out)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.in_proj_weight.T + self.in_proj_bias))


def with_bank(model: torch.nn.Module, dim: int = 5) -> torch.nn.Module:
    object.__setattr__(model, C.BANK_ATTR, TinyBank(dim))
    return model


def random_pivots(model: torch.nn.Module, density: float, g: torch.Generator, skip=()) -> PivotSet:
    masks = {}
    for n, p in model.named_parameters():
        m = torch.rand(p.shape, generator=g) < density
        if n in skip:
            m[:] = False
        masks[n] = m
    return PivotSet.from_masks(masks)


def tune_fake(model, ident, *, density=0.2, dense=None, seed=0, storage_dtype=torch.float32, tokens_dim=5, **kw):
    """Snapshot the base, perturb the pivots (and dense rows) as a training run would, capture the concept."""
    g = torch.Generator().manual_seed(seed)
    piv = random_pivots(model, density, g, skip=kw.get("skip", ()))
    snap = snapshot_base(model, piv, dense)
    masks = piv.to_masks()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            p = params[n]
            m = m.clone()
            if dense and n in dense:
                rows = dense[n]
                m[rows if rows is not None else slice(None)] = True
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            p[m] += noise[m]
    tokens = {ident: torch.randn(3, tokens_dim, generator=g)}
    return Concept.capture(
        model, piv, identifiers=[ident], tokens=tokens, dense=dense, base=snap, meta={"preset": "test"},
        storage_dtype=storage_dtype,
    )  # fmt: skip


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_state_equal(model, ref):
    for n, p in model.named_parameters():
        assert p.dtype == ref[n].dtype
        assert torch.equal(p.detach().view(torch.uint8) if p.dtype == torch.bfloat16 else p.detach(),
                           ref[n].view(torch.uint8) if p.dtype == torch.bfloat16 else ref[n]), n  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------------
def test_varint_round_trip_awkward_values():
    edge = torch.tensor([0, 1, 127, 128, 255, 16383, 16384, 2**21 - 1, 2**21, 2**28, 2**31 - 1, 2**35 - 1])
    v = torch.cat([edge, torch.randint(0, 2**31, (997,)), torch.randint(0, 300, (1000,))])
    packed = F._varint_encode(v)
    assert packed.dtype == torch.uint8
    assert torch.equal(F._varint_decode(packed, v.numel()), v)
    assert F._varint_encode(torch.tensor([127])).numel() == 1 and F._varint_encode(torch.tensor([128])).numel() == 2
    with pytest.raises(ConceptFileError):
        F._varint_decode(packed[:-1], v.numel())  # ends inside a value
    with pytest.raises(ConceptFileError):
        F._varint_decode(packed, v.numel() + 1)


@pytest.mark.parametrize("counts_pattern", ["mixed", "all_empty", "single", "dense_run"])
def test_index_packing_round_trip(counts_pattern):
    g = torch.Generator().manual_seed(1)
    sizes = {"mixed": [1, 278011, 0, 97, 1024 * 3], "all_empty": [0, 0], "single": [1], "dense_run": [4096]}
    shapes = sizes[counts_pattern]
    parts, counts = [], []
    for n in shapes:
        if counts_pattern == "dense_run":
            idx = torch.arange(n)
        else:
            idx = torch.nonzero(torch.rand(n, generator=g) < 0.3).reshape(-1) if n else torch.empty(0, dtype=torch.long)
        if n and counts_pattern == "mixed" and n > 1:
            idx = torch.unique(torch.cat([idx, torch.tensor([0, n - 1])]))  # first and last entries
        parts.append(idx)
        counts.append(idx.numel())
    idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    packed = F._pack_indices(idx.to(torch.int32), counts)
    assert torch.equal(F._unpack_indices(packed, counts), idx)
    if counts_pattern == "dense_run":
        assert packed.numel() == 4096  # consecutive indices cost one byte each


# ---------------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------------
def test_save_load_fp32_bitwise(tmp_path):
    m = with_bank(Net())
    c = tune_fake(m, "<v1>", dense={"in_proj_weight": slice(24, 36)}, skip=("in_proj_weight",))
    path = tmp_path / "c.ppt"
    c.save(path)
    r = Concept.load(path)
    assert r.equal(c)
    assert r.values.dtype == torch.float32 and r.dense_rows == {"in_proj_weight": (24, 36)}
    assert r.meta["preset"] == "test" and r.meta["ppt_fast_version"]
    assert set(r.fingerprint["tensors"]) == set(c.touched_names())
    # Re-saving a loaded concept gives the same bytes (deterministic file).
    c2 = tmp_path / "c2.ppt"
    r.save(c2)
    assert path.read_bytes() == c2.read_bytes()
    assert load_concepts(path)[0].equal(c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_load_half_storage_within_tolerance(tmp_path, dtype):
    m = with_bank(Net())
    tuned_ref = None
    c = tune_fake(m, "<v1>", dense={"in_proj_bias": None}, storage_dtype=dtype)
    tuned_ref = state(m)
    c.save(tmp_path / "c.ppt")
    r = Concept.load(tmp_path / "c.ppt")
    assert r.values.dtype == dtype and r.equal(c)
    # Stored values are the tuned fp32 values rounded once; check against the model's tuned values.
    exact = torch.cat([tuned_ref[n].reshape(-1)[idx.long()] for n, idx in r.pivots])
    rel = ((r.values.float() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert rel <= STORAGE_RTOL[dtype]
    assert rel > 0  # random fp32 values do not all fit the smaller format: the check above can fail
    dense_rel = (r.dense["in_proj_bias"].float() - tuned_ref["in_proj_bias"]).abs() / tuned_ref["in_proj_bias"].abs()
    assert dense_rel.max().item() <= STORAGE_RTOL[dtype]
    assert r.tokens["<v1>"].dtype == torch.float32  # tokens always fp32


def test_file_is_compact(tmp_path):
    """1 % pivots over [3072, 1024]-sized tensors: varint gaps ~1.3 B/pivot, fp16 values 2 B: <= 3.5 B per pivot."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3072, 1024)] * 4
    masks = {f"layers.{i}.in_proj_weight": torch.rand(s, generator=g) < 0.01 for i, s in enumerate(shapes)}
    piv = PivotSet.from_masks(masks)
    c = Concept(["<v1>"], {"<v1>": torch.randn(3, 1024)}, piv, torch.randn(piv.count).half())
    c.save(tmp_path / "c.ppt")
    size = os.path.getsize(tmp_path / "c.ppt")
    per_pivot = (size - 3 * 1024 * 4) / piv.count
    assert per_pivot < 3.5, per_pivot
    gaps = load(open(tmp_path / "c.ppt", "rb").read())["c0.pivots.gaps"]
    assert 1.0 < gaps.numel() / piv.count < 1.5  # varint: most gaps (mean 100) fit one byte, the rest two


# ---------------------------------------------------------------------------------------------------------------------
# apply / remove
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_remove_bitwise(dtype):
    m = with_bank(Net().to(dtype))
    base = state(m)
    c = tune_fake(m, "<v1>", dense={"in_proj_weight": slice(12, 24)})
    tuned = state(m)
    c.remove(m)  # captured with a snapshot: registered as applied, remove restores the base
    assert_state_equal(m, base)
    assert not m._ppt_fast_identifier_bank.has("<v1>")
    for _ in range(2):
        c.apply(m)
        assert_state_equal(m, tuned)  # fp32 storage: exactly the tuned values, whatever the model dtype
        assert torch.equal(m._ppt_fast_identifier_bank.tokens["<v1>"], c.tokens["<v1>"])
        c.remove(m)
        assert_state_equal(m, base)
    assert not hasattr(m, C.REGISTRY_ATTR)


def test_apply_scale_from_base():
    m = with_bank(Net().double().float())
    base = state(m)
    c = tune_fake(m, "<v1>", density=0.3)
    tuned = state(m)
    c.remove(m)
    for scale in (0.5, -1.0, 2.5, 0.0):
        c.apply(m, scale=scale)
        for n, p in m.named_parameters():
            want = (base[n].double() + scale * (tuned[n].double() - base[n].double())).float()
            # fp32 math from base: base + scale * (tuned - base) has two fp32 roundings (difference, then fma-less
            # multiply-add): within 2 ulp of the fp64 value.
            torch.testing.assert_close(p.detach(), want, rtol=2.5e-7, atol=1e-7)
            changed = ~torch.eq(base[n], tuned[n])
            if scale == 0.0:
                assert torch.equal(p.detach(), base[n])
            else:
                assert bool((p.detach()[changed] != base[n][changed]).all())
        c.remove(m)
        assert_state_equal(m, base)


def test_apply_twice_refused_and_remove_unapplied():
    m = with_bank(Net())
    c = tune_fake(m, "<v1>")
    with pytest.raises(ConceptError, match="already applied"):
        c.apply(m)
    c.remove(m)
    with pytest.raises(ConceptError, match="not applied"):
        c.remove(m)
    m._ppt_fast_identifier_bank.add("<v1>", torch.zeros(3, 5))  # e.g. left by a tune run
    with pytest.raises(ConceptError, match="identifier bank"):
        c.apply(m)


def test_musicgen_style_model_object_accepted():
    class MG:
        def __init__(self, lm):
            self.lm = lm

    lm = with_bank(Net())
    base = state(lm)
    c = tune_fake(lm, "<v1>")
    c.remove(MG(lm))
    assert_state_equal(lm, base)
    c.apply(MG(lm))
    assert lm._ppt_fast_identifier_bank.has("<v1>")
    c.remove(lm)
    with pytest.raises(TypeError, match="nn.Module"):
        c.apply(object())


def test_no_bank_applies_parameters_and_warns(caplog):
    m = with_bank(Net())
    base = state(m)
    c = tune_fake(m, "<v1>")
    tuned = state(m)
    c.remove(m)
    plain = copy.deepcopy(m)
    object.__delattr__(plain, C.BANK_ATTR)
    with caplog.at_level(logging.WARNING, logger="ppt_fast.concept"):
        c.apply(plain)
    assert "no identifier bank" in caplog.text
    assert_state_equal(plain, tuned)
    c.remove(plain)
    assert_state_equal(plain, base)


def test_save_load_apply_on_fresh_copy_same_outputs(tmp_path):
    torch.manual_seed(3)
    m = with_bank(Net())
    fresh = copy.deepcopy(m)
    x = torch.randn(9, 12)
    out_base = fresh(x)
    c = tune_fake(m, "<v1>", dense={"in_proj_weight": slice(24, 36)})
    out_tuned = m(x)
    assert not torch.equal(out_tuned, out_base)
    c.save(tmp_path / "c.ppt")
    r = Concept.load(tmp_path / "c.ppt")
    r.apply(fresh)
    assert torch.equal(fresh(x), out_tuned)
    r.remove(fresh)
    assert torch.equal(fresh(x), out_base)


def test_capture_from_fingerprint_or_original_tensors():
    m = with_bank(Net())
    g = torch.Generator().manual_seed(5)
    piv = random_pivots(m, 0.1, g)
    fp = fingerprint_model(m)
    originals = state(m)
    with torch.no_grad():
        m.in_proj_weight[piv.to_masks()["in_proj_weight"]] += 1.0
    a = Concept.capture(m, piv, identifiers=["<a>"], base=fp)
    assert not hasattr(m, C.REGISTRY_ATTR)  # a fingerprint alone cannot restore: nothing is registered
    b = Concept.capture(m, piv, identifiers=["<b>"], base=originals)
    b.remove(m)  # original tensors given: registered, remove restores
    assert_state_equal(m, originals)
    a.check_model(m)
    assert a.fingerprint == b.fingerprint


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
def test_fingerprint_mismatch_refused_force_overrides():
    m = with_bank(Net())
    other = with_bank(Net())  # same names and shapes, other weights
    c = tune_fake(m, "<v1>")
    tuned = state(m)
    with pytest.raises(FingerprintMismatch, match="force=True"):
        c.apply(other)
    assert not other._ppt_fast_identifier_bank.has("<v1>")
    c.apply(other, force=True)
    for n, p in other.named_parameters():
        mask = c.pivots.to_masks()[n] if n in c.pivots.names else torch.zeros_like(p, dtype=torch.bool)
        assert torch.equal(p[mask], tuned[n][mask])
    wrong_shape = with_bank(Net(d=8))
    with pytest.raises(FingerprintMismatch, match="does not override"):
        c.apply(wrong_shape, force=True)  # could not be written into these tensors at all
    assert not hasattr(wrong_shape, C.REGISTRY_ATTR)


def test_fingerprint_accepts_bf16_copy_of_fp32_base():
    m = with_bank(Net())
    half = with_bank(copy.deepcopy(m).to(torch.bfloat16))
    object.__setattr__(half, C.BANK_ATTR, TinyBank(5))
    c = tune_fake(m, "<v1>")
    c.apply(half)  # hashes compared after rounding to bf16: same base, other dtype
    c.remove(half)
    other_bf16 = with_bank(Net().to(torch.bfloat16))
    with pytest.raises(FingerprintMismatch):
        c.apply(other_bf16)


def _corrupt(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_truncated_and_tampered_files(tmp_path):
    m = with_bank(Net())
    c = tune_fake(m, "<v1>")
    path = tmp_path / "c.ppt"
    c.save(path)
    data = path.read_bytes()
    (tmp_path / "t.ppt").write_bytes(data[: len(data) - 7])
    with pytest.raises(ConceptFileError, match="truncated"):
        Concept.load(tmp_path / "t.ppt")
    (tmp_path / "e.ppt").write_bytes(b"")
    with pytest.raises(ConceptFileError):
        Concept.load(tmp_path / "e.ppt")
    _corrupt(path, len(data) - 3)  # a byte of the last tensor's payload
    with pytest.raises(ConceptFileError, match="checksum"):
        Concept.load(path)
    # Tampered header: change a row count in the JSON, keep the JSON valid.
    path.write_bytes(data)
    meta, tensors = _read(path)
    header = json.loads(meta["header"])
    header["concepts"][0]["meta"]["preset"] = "evil"
    meta["header"] = json.dumps(header)
    path.write_bytes(save(tensors, metadata=meta))
    with pytest.raises(ConceptFileError, match="checksum"):
        Concept.load(path)
    (tmp_path / "x.ppt").write_bytes(save({"a": torch.zeros(2)}, metadata={"format": "other"}))
    with pytest.raises(ConceptFileError, match="not a concept file"):
        Concept.load(tmp_path / "x.ppt")
    with pytest.raises(ConceptError, match="cannot read"):
        Concept.load(tmp_path / "missing.ppt")


def _read(path):
    tensors, meta = F._read_safetensors(path.read_bytes(), str(path))
    return meta, tensors


def test_newer_format_version_refused(tmp_path):
    m = with_bank(Net())
    c = tune_fake(m, "<v1>")
    meta, tensors = F._encode([c])
    meta["format_version"] = str(C.FORMAT_VERSION + 1)
    (tmp_path / "n.ppt").write_bytes(save(tensors, metadata=meta))
    with pytest.raises(ConceptVersionError, match="upgrade ppt_fast"):
        Concept.load(tmp_path / "n.ppt")


def test_duplicate_identifiers_refused(tmp_path):
    m = with_bank(Net())
    m2 = copy.deepcopy(m)
    a = tune_fake(m, "<v1>", seed=1)
    b = tune_fake(m2, "<v1>", seed=2)
    with pytest.raises(ConceptError, match="identifier '<v1>'"):
        save_concepts([a, b], tmp_path / "b.ppt")
    assert not (tmp_path / "b.ppt").exists()
    with pytest.raises(ConceptError, match="repeat"):
        Concept(["<x>", "<x>"], {}, a.pivots, a.values)
    with pytest.raises(ConceptError, match="one non-empty word"):
        Concept(["my concept"], {}, a.pivots, a.values)


def test_unwritable_path(tmp_path):
    m = with_bank(Net())
    c = tune_fake(m, "<v1>")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConceptError, match="cannot write the concept file"):
        c.save(blocker / "sub" / "c.ppt")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write into read-only folders (root)")
        with pytest.raises(ConceptError, match="cannot write"):
            c.save(ro / "c.ppt")
    finally:
        os.chmod(ro, 0o700)


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch, fail_at):
    m = with_bank(Net())
    m2 = copy.deepcopy(m)
    old = tune_fake(m, "<v1>", seed=1)
    new = tune_fake(m2, "<v2>", seed=2)
    path = tmp_path / "c.ppt"
    old.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    if fail_at == "write":
        real_open = open

        class Half:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])  # half of it lands, then the disk is full
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(_io, "open", lambda path, mode: Half(real_open(path, mode)), raising=False)
    elif fail_at == "fsync":
        monkeypatch.setattr(_io.os, "fsync", boom)
    else:
        monkeypatch.setattr(_io.os, "replace", boom)
    with pytest.raises(ConceptError, match="No space left"):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ppt"]  # no temporary file left behind
    assert Concept.load(path).equal(old)


def test_bad_constructor_and_capture_arguments():
    m = with_bank(Net())
    piv = random_pivots(m, 0.1, torch.Generator().manual_seed(0))
    with pytest.raises(ConceptError, match="pivots.count"):
        Concept(["<v1>"], {}, piv, torch.zeros(piv.count + 1))
    with pytest.raises(ConceptError, match="not among the identifiers"):
        Concept(["<v1>"], {"<v2>": torch.zeros(3, 5)}, piv, torch.zeros(piv.count))
    with pytest.raises(ConceptError, match="float32, float16 or bfloat16"):
        Concept(["<v1>"], {}, piv, torch.zeros(piv.count, dtype=torch.int32))
    with pytest.raises(ConceptError, match="not a parameter"):
        Concept.capture(m, piv, identifiers=["<v1>"], dense={"nope": None}, base=fingerprint_model(m))
    with pytest.raises(ConceptError, match="rows"):
        Concept.capture(m, piv, identifiers=["<v1>"], dense={"in_proj_weight": (30, 99)}, base=fingerprint_model(m))
    with pytest.raises(ConceptError, match="storage dtype"):
        Concept.capture(m, piv, identifiers=["<v1>"], base=fingerprint_model(m), storage_dtype=torch.int8)
    with pytest.raises(ConceptError, match="lacks touched tensors"):
        Concept.capture(m, piv, identifiers=["<v1>"], base=fingerprint_model(m, ["head.bias"]))


def test_half_storage_apply_within_tolerance_and_remove_bitwise():
    m = with_bank(Net())
    base = state(m)
    c = tune_fake(m, "<v1>", storage_dtype=torch.float16)
    tuned = state(m)
    c.remove(m)
    c.apply(m)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), tuned[n], rtol=STORAGE_RTOL[torch.float16], atol=2.0**-25)
    assert any(not torch.equal(p.detach(), tuned[n]) for n, p in m.named_parameters())  # rounding is visible
    c.remove(m)
    assert_state_equal(m, base)


def test_tokens_only_concept(tmp_path):
    m = with_bank(Net())
    base = state(m)
    names = [n for n, _ in m.named_parameters()]
    empty = PivotSet.empty(names, [p.shape for _, p in m.named_parameters()])
    c = Concept.capture(m, empty, identifiers=["<t>"], tokens={"<t>": torch.randn(3, 5)}, base=fingerprint_model(m))
    assert c.pivots.count == 0 and c.touched_names() == []
    c.save(tmp_path / "t.ppt")
    r = Concept.load(tmp_path / "t.ppt")
    assert r.equal(c) and os.path.getsize(tmp_path / "t.ppt") < 2000
    r.apply(m)
    assert m._ppt_fast_identifier_bank.has("<t>")
    assert_state_equal(m, base)
    r.remove(m)
    assert not m._ppt_fast_identifier_bank.has("<t>")


def test_crafted_file_with_valid_checksum_but_bad_indices(tmp_path):
    """The checksum catches accidents, not forgery: decoding still checks every index against its tensor."""
    m = with_bank(Net())
    c = tune_fake(m, "<v1>")
    meta, tensors = F._encode([c])
    k0 = c.pivots.counts()[0]
    for shape, match in (([1], "pivots in"), ([k0], "pass its")):  # [k0]: room for the count, not the indices
        header = json.loads(meta["header"])
        header["concepts"][0]["pivots"]["shapes"][0] = shape
        header["concepts"][0]["fingerprint"] = {}
        meta["header"] = F._canonical_json(header)
        meta["checksum"] = F._checksum(meta["header"], tensors)
        (tmp_path / "f.ppt").write_bytes(F._serialize(tensors, meta))
        with pytest.raises(ConceptFileError, match=match):
            Concept.load(tmp_path / "f.ppt")


def test_capture_from_tune_result_like_object():
    """`Concept.capture(result, identifier)`: the path ppt_fast.tune() takes."""

    class MG:
        def __init__(self, lm):
            self.lm = lm

    class Result:
        pass

    lm = with_bank(Net())
    base = state(lm)
    g = torch.Generator().manual_seed(4)
    pa, pb = random_pivots(lm, 0.2, g), random_pivots(lm, 0.2, g)
    r = Result()
    r.model, r.identifiers, r.pivots = MG(lm), ["<a>", "<b>"], {"<a>": pa, "<b>": pb}
    r.dense_rows = {"in_proj_weight": (12, 36)}
    r.base_snapshot = snapshot_base(lm, pa | pb, r.dense_rows)
    r.tokens = {"<a>": torch.randn(3, 5), "<b>": torch.randn(3, 5)}
    r.settings = {"preset": "dreamstyler", "ratio": 0.2}
    with torch.no_grad():
        for n, mk in (pa | pb).to_masks().items():
            lm.get_parameter(n)[mk] += 1.0
        lm.in_proj_weight[12:36] += 1.0
    tuned = state(lm)
    ca, cb = Concept.capture(r, "<a>"), Concept.capture(r, "<b>")
    assert ca.meta["preset"] == "dreamstyler" and ca.meta["trained_with"] == ["<a>", "<b>"]
    assert ca.meta["joint_run"] == cb.meta["joint_run"]
    assert ca.dense_rows == {"in_proj_weight": (12, 36)} and torch.equal(
        ca.dense["in_proj_weight"], tuned["in_proj_weight"][12:36]
    )
    ca.remove(lm)
    cb.remove(lm)
    assert_state_equal(lm, base)
    C.compose([cb, ca], MG(lm))  # the joint run's concepts together give back the jointly tuned model
    assert_state_equal(lm, tuned)
    C.remove_all(lm)
    with pytest.raises(ConceptError, match="not one of"):
        Concept.capture(r, "<c>")


def test_unsorted_or_out_of_range_indices_refused():
    names, shapes = ["a", "b"], [(4, 3), (5,)]
    for idx, match in (([3, 1, 0, 2], "strictly increas"), ([1, 1, 0, 2], "strictly increas"),
                       ([0, 12, 0, 2], "past the end|outside"), ([0, 1, 4, 5], "past the end|outside")):  # fmt: skip
        with pytest.raises(ValueError, match=match):  # PivotError from PivotSet itself, or ConceptError
            piv = PivotSet(names, shapes, [0, 2, 4], torch.tensor(idx, dtype=torch.int32))
            Concept(["<v1>"], {}, piv, torch.zeros(4))
    ok = PivotSet(names, shapes, [0, 2, 4], torch.tensor([5, 11, 0, 4], dtype=torch.int32))  # resets per tensor
    assert Concept(["<v1>"], {}, ok, torch.zeros(4)).pivots.count == 4


# ---------------------------------------------------------------------------------------------------------------------
# No input can hurt: non-finite values, unverified concepts, scales (issue 22)
# ---------------------------------------------------------------------------------------------------------------------
def _forge(path, c, change):
    """Write `c` with `change(header_entry, tensors)` applied and the (unkeyed) checksum recomputed: a crafted file."""
    meta, tensors = F._encode([c])
    header = json.loads(meta["header"])
    change(header["concepts"][0], tensors)
    meta["header"] = json.dumps(header)
    meta["checksum"] = F._checksum(meta["header"], tensors)
    path.write_bytes(F._serialize(tensors, meta))


def _poison(name, value):
    def change(entry, tensors):
        entry["fingerprint"] = {}
        t = tensors[name].clone()
        t.view(-1)[torch.randint(t.numel(), ())] = value
        tensors[name] = t

    return change


@pytest.mark.parametrize("tensor, value, what", [
    ("c0.pivots.values", float("nan"), "the tuned values of"), ("c0.pivots.values", float("inf"), "tuned values"),
    ("c0.dense.0", -float("inf"), "dense tuned values of 'in_proj_weight'"),
    ("c0.tokens.0", float("nan"), "token embeddings of '<v1>'"),
])  # fmt: skip
def test_crafted_nonfinite_file_refused_at_load(tmp_path, tensor, value, what):
    """The issue's file: NaN weights, the fingerprint removed, the checksum recomputed. Refused, naming the tensor."""
    m = with_bank(Net())
    base = state(m)
    c = tune_fake(m, "<v1>", dense={"in_proj_weight": slice(24, 36)})
    c.remove(m)
    path = tmp_path / "nan.ppt"
    _forge(path, c, _poison(tensor, value))
    with pytest.raises(ConceptFileError, match=f"{what}.*non-finite") as e:
        Concept.load(path)
    assert str(path) in str(e.value)
    assert_state_equal(m, base)


def test_header_with_nan_or_overflowing_number_refused(tmp_path):
    m = with_bank(Net())
    c = tune_fake(m, "<v1>")
    for bad in (float("nan"), float("inf"), 1e999):
        _forge(tmp_path / "h.ppt", c, lambda e, t, bad=bad: e["meta"].update(lr=bad))
        with pytest.raises(ConceptFileError, match="non-finite number|overflows"):
            Concept.load(tmp_path / "h.ppt")


def test_capture_and_save_refuse_nonfinite(tmp_path):
    m = with_bank(Net())
    g = torch.Generator().manual_seed(8)
    piv = random_pivots(m, 0.2, g)
    fp = fingerprint_model(m)
    name, idx = next((n, i) for n, i in piv if i.numel())
    with torch.no_grad():
        m.get_parameter(name).view(-1)[idx[int(torch.randint(idx.numel(), ()))].long()] = float("nan")  # diverged
    with pytest.raises(ConceptError, match=f"tuned values of {name!r} hold 1 non-finite"):
        Concept.capture(m, piv, identifiers=["<v1>"], base=fp)
    assert not hasattr(m, C.REGISTRY_ATTR)
    ok = tune_fake(with_bank(Net()), "<v2>")
    ok.values[int(torch.randint(ok.values.numel(), ()))] = float("inf")  # changed after it was built
    with pytest.raises(ConceptError, match="non-finite"):
        ok.save(tmp_path / "inf.ppt")
    assert not (tmp_path / "inf.ppt").exists()
    ok.values.nan_to_num_(posinf=1.0)
    ok.tokens["<v2>"][0, 0] = float("nan")
    with pytest.raises(ConceptError, match="token embeddings of '<v2>'"):
        save_concepts([ok], tmp_path / "nan.ppt")
    assert not (tmp_path / "nan.ppt").exists()


def test_apply_refuses_concept_changed_to_nonfinite_and_leaves_model():
    m = with_bank(Net())
    base = state(m)
    c = tune_fake(m, "<v1>", dense={"in_proj_bias": None})
    c.remove(m)
    c.dense["in_proj_bias"][int(torch.randint(c.dense["in_proj_bias"].numel(), ()))] = float("nan")
    with pytest.raises(ConceptError, match="dense tuned values of 'in_proj_bias'"):
        c.apply(m)
    assert_state_equal(m, base)
    assert not hasattr(m, C.REGISTRY_ATTR)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), C.MAX_SCALE * 1.01, -11.0, "2", None,
                                   True, [1.0]])  # fmt: skip
def test_bad_scales_refused_before_anything_changes(scale):
    m = with_bank(Net())
    base = state(m)
    c = tune_fake(m, "<v1>")
    c.remove(m)
    with pytest.raises(ConceptError, match="scale"):
        c.apply(m, scale=scale)
    with pytest.raises(ConceptError, match="scale"):
        C.compose([c], m, scales=[scale])
    assert_state_equal(m, base)
    assert not hasattr(m, C.REGISTRY_ATTR)


def test_scale_bound_is_inclusive():
    m = with_bank(Net())
    base = state(m)
    c = tune_fake(m, "<v1>")
    c.remove(m)
    for scale in (C.MAX_SCALE, -C.MAX_SCALE):
        c.apply(m, scale=scale)
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
        assert not all(torch.equal(p.detach(), base[n]) for n, p in m.named_parameters())
        c.remove(m)
    assert_state_equal(m, base)


@pytest.mark.parametrize("drop", ["all", "one"])
def test_unverified_concept_needs_explicit_allow(tmp_path, drop):
    """No fingerprint (or none for one touched tensor): refused unless allow_unverified=True, naming file and fix."""
    m = with_bank(Net())
    base = state(m)
    c = tune_fake(m, "<v1>")
    tuned = state(m)
    c.remove(m)
    path = tmp_path / "unverified.ppt"
    victim = c.touched_names()[int(torch.randint(len(c.touched_names()), ()))]

    def change(entry, tensors):
        if drop == "all":
            entry["fingerprint"] = {}
        else:
            del entry["fingerprint"]["tensors"][victim]

    _forge(path, c, change)
    r = Concept.load(path)  # loading is fine: the file is intact, only unverifiable
    assert r.unverified_names() == (c.touched_names() if drop == "all" else [victim])
    for attempt in (lambda: r.apply(m), lambda: C.compose([r], m)):
        with pytest.raises(ConceptError, match="allow_unverified=True") as e:
            attempt()
        assert str(path) in str(e.value) and repr(victim) in str(e.value)
        assert_state_equal(m, base)
    r.apply(m, allow_unverified=True)
    assert_state_equal(m, tuned)
    r.remove(m)
    C.compose([r], m, allow_unverified=True)
    assert_state_equal(m, tuned)
    C.remove_all(m)
    assert_state_equal(m, base)


def test_capture_without_base_is_unverified(caplog):
    m = with_bank(Net())
    piv = random_pivots(m, 0.1, torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING, logger="ppt_fast.concept"):
        c = Concept.capture(m, piv, identifiers=["<v1>"])
    assert "allow_unverified=True" in caplog.text
    assert c.unverified_names() == c.touched_names()
    with pytest.raises(ConceptError, match="allow_unverified"):
        c.apply(with_bank(Net()))


def test_nonfinite_meta_is_stored_as_text_and_header_is_strict_json(tmp_path):
    m = with_bank(Net())
    g = torch.Generator().manual_seed(4)
    piv = random_pivots(m, 0.1, g)
    c = Concept.capture(m, piv, identifiers=["<v1>"], base=fingerprint_model(m),
                        meta={"max_norm": float("inf"), "lr": 1e-3, "nested": [float("nan")]})  # fmt: skip
    c.save(tmp_path / "m.ppt")
    meta, _ = _read(tmp_path / "m.ppt")
    json.loads(meta["header"], parse_constant=lambda name: pytest.fail(f"header holds {name}"))
    r = Concept.load(tmp_path / "m.ppt")
    assert r.meta["max_norm"] == "inf" and r.meta["nested"] == ["nan"] and r.meta["lr"] == 1e-3


def test_state_digest_covers_every_state_item_including_0_dim_buffers():
    """The one whole-module digest (base models and codecs): names, dtypes, shapes and bytes of every state item,
    0-dim buffers too; any change of one moves it, a copy does not."""
    from ppt_fast.concept.fingerprint import state_digest

    m = torch.nn.Linear(3, 2)
    m.register_buffer("count", torch.tensor(7, dtype=torch.int64))
    m.register_buffer("scale", torch.tensor(0.5, dtype=torch.bfloat16))
    d = state_digest(m)
    assert d == state_digest(copy.deepcopy(m)) and len(d) == 64
    for change in (lambda x: x.count.add_(1), lambda x: x.scale.mul_(2), lambda x: x.weight.data[1, 2].add_(1e-3)):
        other = copy.deepcopy(m)
        change(other)
        assert state_digest(other) != d
    other = copy.deepcopy(m)
    other.count = other.count.to(torch.int32)  # same value, other dtype
    assert state_digest(other) != d
