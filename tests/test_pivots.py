"""PivotSet: set algebra against dense masks, per-tensor density, save/load, relayout."""

from __future__ import annotations

import os

import pytest
import torch

from ppt_fast.pivots import PivotSet

SHAPES = {"a": (5, 7), "empty": (0, 3), "b": (3,), "c": (4, 2, 3), "one": (1,)}


def random_set(density: float) -> PivotSet:
    return PivotSet.from_masks({n: torch.rand(s) < density for n, s in SHAPES.items()})


@pytest.mark.parametrize("da,db", [(0.5, 0.5), (0.1, 0.9), (0.0, 0.3), (1.0, 0.2)])
def test_set_algebra_matches_masks(da, db):
    a, b = random_set(da), random_set(db)
    ma, mb = a.to_masks(), b.to_masks()
    for op, f in (
        ("union", lambda x, y: x | y),
        ("intersection", lambda x, y: x & y),
        ("difference", lambda x, y: x & ~y),
    ):
        got = getattr(a, op)(b)
        want = PivotSet.from_masks({n: f(ma[n], mb[n]) for n in ma})
        assert got.equal(want), op
        assert got.indices.dtype == torch.int32
        for _, idx in got:  # strictly increasing within each tensor
            assert bool((idx[1:] > idx[:-1]).all())
    assert (a | b).equal(b | a) and (a & b).equal(b & a)
    assert (a - a).count == 0 and (a | a).equal(a)


def test_set_algebra_needs_same_layout():
    a = random_set(0.3)
    other = PivotSet.from_masks({"a": torch.rand(5, 7) < 0.3, "b": torch.rand(4) < 0.5})
    with pytest.raises(ValueError, match="different tensors"):
        a | other
    reordered = PivotSet.from_masks({n: a.to_masks()[n] for n in reversed(SHAPES)})
    with pytest.raises(ValueError, match="same order"):
        a & reordered
    with pytest.raises(TypeError, match="PivotSet"):
        a.union(a.to_masks())


def test_relayout_then_union():
    a = random_set(0.3)
    small = PivotSet.from_masks({"c": torch.rand(4, 2, 3) < 0.5})
    wide = small.relayout(a.names, a.shapes)
    assert wide.same_layout(a) and wide.count == small.count
    assert torch.equal(wide.to_masks()["c"], small.to_masks()["c"])
    assert torch.equal((a | wide).to_masks()["c"], a.to_masks()["c"] | small.to_masks()["c"])
    with pytest.raises(ValueError, match="drops tensors"):
        a.relayout(["b"], [(3,)])
    with pytest.raises(ValueError, match="shape"):
        small.relayout(["c"], [(24,)])


def test_per_tensor_density():
    masks = {"a": torch.zeros(5, 7, dtype=torch.bool), "b": torch.ones(3, dtype=torch.bool)}
    masks["a"].view(-1)[[0, 3, 9]] = True
    ps = PivotSet.from_masks(masks)
    assert ps.densities() == {"a": pytest.approx(3 / 35), "b": 1.0}
    assert ps.density() == pytest.approx(6 / 38)


def test_save_load_round_trip_is_atomic(tmp_path):
    a = random_set(0.4)
    path = tmp_path / "sub" / "pivots.safetensors"
    a.save(path)
    b = PivotSet.load(path)
    assert b.equal(a) and b.names == a.names and b.shapes == a.shapes
    # overwrite in place; no temporary files are left behind
    c = random_set(0.1)
    c.save(path)
    assert PivotSet.load(path).equal(c)
    assert os.listdir(path.parent) == ["pivots.safetensors"]
    empty = PivotSet.empty(list(SHAPES), list(SHAPES.values()))
    empty.save(tmp_path / "e.safetensors")
    assert PivotSet.load(tmp_path / "e.safetensors").equal(empty)


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a PivotSet file"):
        PivotSet.load(tmp_path / "x.safetensors")


def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    a = random_set(0.3)
    path = tmp_path / "p.safetensors"
    a.save(path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        random_set(0.9).save(path)
    assert PivotSet.load(path).equal(a)
    assert os.listdir(tmp_path) == ["p.safetensors"]


# ---- crafted pivot files and hand-made PivotSets: refused with the tensor's name, whatever made them ---------------
def _write_pivot_file(path, names, shapes, offsets, indices) -> None:
    import json

    from safetensors.torch import save_file

    meta = {"format": "ppt_fast.PivotSet/1", "layout": json.dumps({"names": names, "shapes": shapes})}
    save_file({"indices": indices, "offsets": offsets}, str(path), metadata=meta)


CRAFTED = {
    "index_numel": ([1, 5], "index 16 of tensor 'b' is outside"),
    "index_minus_one": ([-1, 5], "index -1 of tensor 'b' is outside"),
    "index_int32_max": ([3, 2**31 - 1], "index 2147483647 of tensor 'b' is outside"),
    "unsorted": ([9, 4], "tensor 'b' do not strictly increase"),
    "duplicate": ([4, 4], "tensor 'b' do not strictly increase"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_load_refuses_crafted_indices_naming_the_tensor(tmp_path, case):
    from ppt_fast import PivotError

    b_idx, message = CRAFTED[case]
    b_idx = [1, 16] if case == "index_numel" else b_idx
    a_idx = sorted(torch.randperm(10)[:3].tolist())  # fresh, valid pivots in the first tensor
    idx = torch.tensor(a_idx + b_idx, dtype=torch.int32)
    path = tmp_path / f"{case}.pivots"
    _write_pivot_file(path, ["a", "b"], [[10], [4, 4]], torch.tensor([0, 3, 5]), idx)
    with pytest.raises(PivotError, match=message):
        PivotSet.load(path)


@pytest.mark.parametrize(
    "offsets,message",
    [([0, 4, 3], "offsets decrease at tensor 'b'"), ([1, 3, 5], "must start at 0"), ([0, 3, 4], "offsets end at 4")],
)
def test_load_refuses_crafted_offsets(tmp_path, offsets, message):
    from ppt_fast import PivotError

    path = tmp_path / "bad.pivots"
    idx = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    _write_pivot_file(path, ["a", "b"], [[10], [4, 4]], torch.tensor(offsets), idx)
    with pytest.raises(PivotError, match=message):
        PivotSet.load(path)


def test_load_refuses_broken_layout_and_foreign_tensors(tmp_path):
    import json

    from safetensors.torch import save_file

    from ppt_fast import PivotError

    path = tmp_path / "x.pivots"
    for layout in ("not json", json.dumps({"names": ["a"]}), json.dumps({"names": ["a"], "shapes": [["x"]]})):
        save_file({"indices": torch.zeros(0, dtype=torch.int32), "offsets": torch.zeros(2, dtype=torch.int64)},
                  str(path), metadata={"format": "ppt_fast.PivotSet/1", "layout": layout})  # fmt: skip
        with pytest.raises(PivotError):
            PivotSet.load(path)
    path.write_bytes(os.urandom(64))
    with pytest.raises(PivotError, match="not a readable PivotSet"):
        PivotSet.load(path)


def test_every_way_of_making_a_pivotset_is_checked_and_marked():
    from ppt_fast import PivotError
    from ppt_fast.pivots import is_marked_valid

    with pytest.raises(PivotError, match="outside"):
        PivotSet(["a"], [(4,)], [0, 1], torch.tensor([4], dtype=torch.int32))
    ps = PivotSet.from_masks({"a": torch.rand(40) < 0.3, "b": torch.rand(5, 6) < 0.3})
    other = PivotSet.from_masks({"a": torch.rand(40) < 0.3, "b": torch.rand(5, 6) < 0.3})
    for made in (ps, ps | other, ps & other, ps - other, ps.relayout(["b", "a"], [(5, 6), (40,)])):
        assert is_marked_valid(made.indices, made.offsets_list, made.numels)
    ps.indices[0] = 39  # an in-place change voids the mark: the next op call checks again
    assert not is_marked_valid(ps.indices, ps.offsets_list, ps.numels)


def test_check_revalidates_after_an_in_place_change():
    from ppt_fast import PivotError

    ps = PivotSet.from_masks({"a": torch.rand(40) < 0.3})
    ps.check()  # marked at construction: nothing to do
    ps.indices[-1] = 40
    with pytest.raises(PivotError, match="outside"):
        ps.check()
