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
