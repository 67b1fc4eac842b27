"""select_pivots on every backend: exact equality with a brute-force stable sort (and the reference with topk)."""

from __future__ import annotations

import pytest
import torch
from _op_cases import AWKWARD_SHAPES, REALISTIC_SHAPES, backend_params, randn, strided_view, use_backend

from ppt_fast.ops import select_pivots
from ppt_fast.ops.select_pivots import NAN_MESSAGE, _select_pivots_ref

OP = "select_pivots"
BACKENDS = backend_params(OP)
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _oracle(scores, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, indices) by brute force with torch.topk: every entry above the k-th largest magnitude, then the
    entries equal to it in (tensor position, flat index) order until k are taken. O(N) memory: small inputs only."""
    flat = [s.detach().cpu().float().abs().reshape(-1) for s in scores]  # exact: fp16/bf16 widen losslessly
    values = torch.cat(flat)
    taken = torch.zeros(values.numel(), dtype=torch.bool)
    if k > 0:
        kth = torch.topk(values, k).values[-1]
        taken = values > kth
        ties = torch.nonzero(values == kth).reshape(-1)[: k - int(taken.sum())]
        taken[ties] = True
    counts, parts, start = [], [], 0
    for f in flat:
        local = torch.nonzero(taken[start : start + f.numel()]).reshape(-1)
        counts.append(local.numel())
        parts.append(local.to(torch.int32))
        start += f.numel()
    return torch.tensor(counts, dtype=torch.int64), torch.cat(parts)


def _run(scores, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ps = select_pivots(scores, count=k)
    return ps.offsets.diff(), ps.indices.cpu()


def _assert_same(got, want):
    assert torch.equal(got[0].cpu(), want[0]), (got[0], want[0])
    assert got[1].dtype == torch.int32
    assert torch.equal(got[1].cpu(), want[1])


def test_reference_matches_topk_on_distinct_scores():
    """The reference radix select picks the same set as torch.topk when no two magnitudes are equal."""
    for _ in range(2):
        scores = [torch.randn(s) for s in [(37, 11), (1,), (500,), (6, 7, 8)]]
        flat = torch.cat([s.reshape(-1) for s in scores])
        assert torch.unique(flat.abs()).numel() == flat.numel()
        for k in (1, 600, flat.numel()):
            counts, indices = _select_pivots_ref(scores, k)
            starts = torch.cumsum(torch.tensor([0] + [s.numel() for s in scores[:-1]]), 0)
            glob = torch.cat(
                [indices[o : o + c].long() + st for o, c, st in zip(counts.cumsum(0) - counts, counts, starts)]
            )
            want = torch.topk(flat.abs(), k).indices
            assert torch.equal(torch.sort(glob).values, torch.sort(want).values)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
def test_awkward_shapes(backend, device, dtype):
    with use_backend(OP, backend, device) as dev:
        scores = [randn(s, dtype, dev) for s in AWKWARD_SHAPES]
        n = sum(s.numel() for s in scores)
        for k in (0, 1, 1000, n // 2, n - 1):
            _assert_same(_run(scores, k), _oracle(scores, k))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_realistic_shapes_mixed_dtypes_one_percent(backend, device):
    with use_backend(OP, backend, device) as dev:
        scores = [randn(s, dt, dev) for s, dt in zip(REALISTIC_SHAPES, SCORE_DTYPES)]
        ps = select_pivots(scores, ratio=0.01)
        n = sum(s.numel() for s in scores)
        assert ps.indices.numel() == round(0.01 * n)
        _assert_same((ps.offsets.diff(), ps.indices), _oracle(scores, round(0.01 * n)))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
def test_ties_take_the_earliest_entries(backend, device, dtype):
    """Many equal magnitudes (signs mixed), all-zero tensors and a tensor with no pivot: exactly k come back,
    ties handed out in (tensor position, flat index) order."""
    with use_backend(OP, backend, device) as dev:
        few_values = (torch.randint(-3, 4, (70001,)).float() * 0.5).to(dtype).to(dev)
        scores = [
            torch.zeros(300, dtype=dtype, device=dev),
            few_values,
            torch.zeros(5, 7, dtype=dtype, device=dev),
            (torch.randint(-3, 4, (129, 3)).float() * 0.5).to(dtype).to(dev),
        ]
        n = sum(s.numel() for s in scores)
        n_nonzero = sum(int((s != 0).sum()) for s in scores)
        for k in (5, 30000, n_nonzero - 1, n_nonzero + 1, n_nonzero + 310, n):
            got = _run(scores, k)
            assert int(got[1].numel()) == k
            _assert_same(got, _oracle(scores, k))
        # k below the number of entries at the top magnitude: only the first tensors holding them get pivots
        got = _run(scores, 3)
        assert got[0].tolist()[0] == 0 and got[0].tolist()[1] == 3
        # all zeros: the first k entries in order
        zeros = [torch.zeros(4, dtype=dtype, device=dev), torch.zeros(9, dtype=dtype, device=dev)]
        _assert_same(_run(zeros, 6), (torch.tensor([4, 2]), torch.tensor([0, 1, 2, 3, 0, 1], dtype=torch.int32)))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_magnitude_order_with_infinities_and_subnormals(backend, device):
    with use_backend(OP, backend, device) as dev:
        s = torch.tensor([1.0, -float("inf"), 1e-45, -2.0, float("inf"), -1e-40, 0.0, -0.0, 3.0])
        scores = [s.to(dev), (-s).to(dev)]
        for k in (1, 2, 3, 5, 8, 12, 17):
            _assert_same(_run(scores, k), _oracle(scores, k))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_views_and_mapping(backend, device):
    with use_backend(OP, backend, device) as dev:
        views = [strided_view((300, 41), torch.float32, dev), strided_view((9, 2, 5), torch.bfloat16, dev)]
        ps = select_pivots({"a": views[0], "b": views[1]}, count=77)
        assert ps.names == ["a", "b"]
        _assert_same((ps.offsets.diff(), ps.indices), _oracle(views, 77))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_tensor(backend, device):
    with use_backend(OP, backend, device) as dev:
        scores = [randn(s, torch.float32, dev) for s in [(1000,), (3, 333), (1,)]]
        ps = select_pivots(scores, ratio=0.1, per_tensor=True)
        assert ps.offsets.diff().tolist() == [100, 100, 1]
        for i, s in enumerate(scores):
            _, want = _oracle([s], [100, 100, 1][i])
            assert torch.equal(ps.indices[ps.offsets[i] : ps.offsets[i + 1]].cpu(), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_is_an_error_naming_the_tensor(backend, device):
    with use_backend(OP, backend, device) as dev:
        for dtype in SCORE_DTYPES:
            bad = randn((70000,), dtype, dev)
            bad[65540] = float("nan")
            scores = {"ok": randn((10,), dtype, dev), "layer.3.fc": bad}
            with pytest.raises(ValueError, match=r"NaN scores in tensor\(s\) \['layer.3.fc'\]"):
                select_pivots(scores, ratio=0.5)
            with pytest.raises(Exception, match=NAN_MESSAGE):
                torch.ops.ppt_fast.select_pivots_packed(list(scores.values()), 3)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    with use_backend(OP, backend, device) as dev:
        scores = [randn((5, 3), torch.float32, dev), randn((70,), torch.bfloat16, dev), randn((1,), torch.half, dev)]
        for k in (0, 40):
            torch.library.opcheck(torch.ops.ppt_fast.select_pivots_packed.default, (scores, k))


def test_bad_inputs_raise_clear_errors():
    s = [torch.randn(10), torch.randn(3, 3)]
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            select_pivots(s, ratio=ratio)
    with pytest.raises(TypeError, match="ratio must be a number"):
        select_pivots(s, ratio=float("nan"))
    with pytest.raises(ValueError, match=r"count=20 must lie in \[0, N\] where N = 19"):
        select_pivots(s, count=20)
    with pytest.raises(ValueError, match="must lie in"):
        select_pivots(s, count=-1)
    with pytest.raises(ValueError, match="exactly one of ratio"):
        select_pivots(s, ratio=0.1, count=1)
    with pytest.raises(ValueError, match="exactly one of ratio"):
        select_pivots(s)
    with pytest.raises(ValueError, match="scores is empty"):
        select_pivots([], ratio=0.1)
    with pytest.raises(TypeError, match=r"scores\[1\] has dtype int32"):
        select_pivots([torch.randn(3), torch.ones(3, dtype=torch.int32)], ratio=0.5)
    with pytest.raises(ValueError, match="is on meta"):
        select_pivots([torch.randn(3), torch.randn(3, device="meta")], ratio=0.5)
    with pytest.raises(ValueError, match="names has 1"):
        select_pivots(s, ratio=0.5, names=["a"])


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpp"])
def test_cpp_kernel_checks_its_own_inputs(backend, device):
    with pytest.raises(RuntimeError, match=r"k=11 must lie in \[0, N\]"):
        torch.ops.ppt_fast._select_pivots_cpp([torch.randn(10)], 11)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ppt_fast._select_pivots_cpp([torch.randn(10).double()], 1)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "ref"])
def test_more_than_2_pow_31_entries(backend, device):
    """One 2^28-entry bf16 tensor listed 9 times: N = 2.4e9 > 2^31 in 512 MiB. 1000 distinct non-zero values sit
    at random positions, the rest are zeros, so the exact answer is known without sorting N entries."""
    with use_backend(OP, backend, device) as dev:
        n, copies = 1 << 28, 9
        positions = torch.unique(torch.randint(0, n, (1100,)))
        positions = positions[torch.randperm(positions.numel())[:1000]]  # distinct, in random order
        values = torch.arange(1000, dtype=torch.int16) + 0x3F80  # 1000 distinct positive bf16 bit patterns
        big = torch.zeros(n, dtype=torch.bfloat16, device=dev)
        big.view(torch.int16)[positions.to(dev)] = values.to(dev)
        scores = [big] * copies
        assert copies * n > 2**31
        by_rank = positions[torch.argsort(values, descending=True)]  # position of the j-th largest value

        # every non-zero of every copy, then the first 5 zeros of copy 0
        counts, indices = torch.ops.ppt_fast.select_pivots_packed(scores, 1000 * copies + 5)
        zeros_first = torch.tensor([i for i in range(20) if i not in set(positions.tolist())][:5])
        first = torch.sort(torch.cat([positions, zeros_first])).values
        rest = torch.sort(positions).values
        assert counts.cpu().tolist() == [1005] + [1000] * (copies - 1)
        assert torch.equal(indices.cpu()[:1005].long(), first)
        assert torch.equal(indices.cpu()[1005:].long(), rest.repeat(copies - 1))

        # the top 500 values of every copy, and the 501st value in copies 0..2 only (ties: earliest tensor)
        counts, indices = torch.ops.ppt_fast.select_pivots_packed(scores, 500 * copies + 3)
        assert counts.cpu().tolist() == [501] * 3 + [500] * (copies - 3)
        top = torch.sort(by_rank[:500]).values
        top_plus = torch.sort(by_rank[:501]).values
        assert torch.equal(indices.cpu().long(), torch.cat([top_plus] * 3 + [top] * (copies - 3)))
