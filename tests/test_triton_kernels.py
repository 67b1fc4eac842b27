"""The Triton backend of the three ops against their pure-torch references.

Run under the interpreter on CPU tensors (fp32 / fp16, tiny grids):
    TRITON_INTERPRET=1 python -m pytest -m interpreter tests/test_triton_kernels.py
On a machine with an NVIDIA GPU (no TRITON_INTERPRET) the same tests run compiled on CUDA tensors, plus the bf16 ones.
Small `tile` / `block` overrides make the tiny test tensors span several programs, so tile edges, tensors that end
mid-tile and the in-program step loop are all exercised.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from tolerances import ADAMW_FP32, tol  # tests/ is on sys.path under pytest

import ppt_fast
from ppt_fast import _backend
from ppt_fast.ops.select_pivots import NAN_MESSAGE, _select_pivots_ref
from ppt_fast.ops.sensitivity_accumulate import MODES, _sensitivity_accumulate_ref
from ppt_fast.ops.sparse_adamw_step import _sparse_adamw_step_ref

pytestmark = pytest.mark.interpreter

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
# bf16 arithmetic is not IEEE in the interpreter: bf16 cases run compiled on a GPU only.
FLOATS = [torch.float32, torch.float16] + ([] if DEVICE.type == "cpu" else [torch.bfloat16])
needs_gpu = pytest.mark.skipif(
    DEVICE.type == "cpu", reason="GPU only: bf16 (not IEEE in the interpreter) or tensors past 2**31 entries"
)

# Awkward sizes: 1 entry, primes, an empty tensor, one that ends mid-tile, a 2-D one.
SHAPES = [(1,), (7, 13), (1031,), (0,), (257,), (3, 5)]


@pytest.fixture(autouse=True)
def _kernels():
    pytest.importorskip("triton")
    from ppt_fast.kernels.triton import _utils

    _utils.clear_caches()
    yield


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------------------------------
# sensitivity_accumulate


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("grad_dtype", FLOATS)
def test_sensitivity_accumulate_matches_reference(mode, grad_dtype):
    from ppt_fast.kernels.triton.sensitivity_accumulate import sensitivity_accumulate_triton

    score_dtype = torch.bfloat16 if grad_dtype == torch.bfloat16 else torch.float32
    scores = [_rand(s, score_dtype).abs() for s in SHAPES]
    expected = [s.clone() for s in scores]
    for _ in range(2):  # accumulate twice: the second pass reads what the first wrote
        grads = [_rand(s, grad_dtype) for s in SHAPES]
        params = [_rand(s, grad_dtype) for s in SHAPES]
        sensitivity_accumulate_triton(scores, grads, params, MODES[mode], tile=64)
        _sensitivity_accumulate_ref(expected, grads, params, mode)
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got, want, **tol(score_dtype))
    assert any(not torch.equal(s, torch.zeros_like(s)) for s in scores)


def test_sensitivity_accumulate_mixed_dtypes_and_public_op():
    """fp32 and fp16 gradients in one call (two dtype groups), a strided gradient, through the public op."""
    shapes = [(33,), (1000,), (2, 9), (1,)]
    dtypes = [torch.float16, torch.float32, torch.float16, torch.float32]
    scores = [_rand(s, torch.float32) for s in shapes]
    grads = [_rand(s, d) for s, d in zip(shapes, dtypes)]
    grads[2] = _rand((9, 2), torch.float16).t()  # non-contiguous view: the op copies it
    params = [_rand(s, d) for s, d in zip(shapes, dtypes)]
    expected = [s.clone() for s in scores]
    with _backend.force("triton"):
        ppt_fast.sensitivity_accumulate(scores, grads, params=params, mode="taylor")
    _sensitivity_accumulate_ref(expected, grads, params, "taylor")
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got, want, **tol(torch.float32))


def test_sensitivity_accumulate_fresh_gradient_tensors():
    """New gradient tensors every step (zero_grad(set_to_none=True)) must not hit a stale pointer table."""
    from ppt_fast.kernels.triton.sensitivity_accumulate import sensitivity_accumulate_triton

    scores = [torch.zeros(s, device=DEVICE) for s in SHAPES]
    expected = [s.clone() for s in scores]
    for _ in range(3):
        grads = [_rand(s, torch.float32) for s in SHAPES]
        sensitivity_accumulate_triton(scores, grads, None, MODES["grad_sq"])
        _sensitivity_accumulate_ref(expected, grads, None, "grad_sq")
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got, want, **tol(torch.float32))


def _free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info(DEVICE)[0] if DEVICE.type == "cuda" else 0


@needs_gpu
def test_sensitivity_accumulate_past_int32_offsets():
    """One tensor of more than 2**31 entries: tile starts and offsets must be int64 all the way to the address."""
    from ppt_fast.kernels.triton.sensitivity_accumulate import sensitivity_accumulate_triton

    n = (1 << 31) + 1001  # ends mid-tile
    if _free_gpu_bytes() < 8 * n:
        pytest.skip("needs ~17 GB of free GPU memory")
    score = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    grad = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    grad[-1003:] = 3.0
    sensitivity_accumulate_triton([score], [grad], None, MODES["grad_sq"])
    del grad
    assert bool(score[: n - 1003].eq(1.0).all()) and bool(score[n - 1003 :].eq(9.0).all())


@needs_gpu
def test_select_pivots_past_int32_total():
    """N > 2**31 over two tensors: output positions and tie ranks are int64; the planted top entries come back."""
    n = (1 << 30) + 7
    if _free_gpu_bytes() < 24 * n:
        pytest.skip("needs ~26 GB of free GPU memory")
    scores = [torch.rand(n, device=DEVICE).to(torch.bfloat16) for _ in range(2)]
    scores.append(torch.rand(n, device=DEVICE).to(torch.bfloat16))
    planted = torch.tensor([0, 5, n - 1], device=DEVICE)
    scores[2][planted] = -4.0  # magnitude 4 beats every rand() value; also ties among themselves
    scores[0][n - 1] = 3.0
    from ppt_fast.kernels.triton.select_pivots import select_pivots_triton

    counts, indices = select_pivots_triton(scores, 4)
    assert counts.tolist() == [1, 0, 3]
    assert indices.tolist() == [n - 1, 0, 5, n - 1]
    counts, indices = select_pivots_triton(scores, 2)  # ties at the threshold: the earliest two
    assert counts.tolist() == [0, 0, 2] and indices.tolist() == [0, 5]
    # All but one entry: output positions run past 2**31.
    for s in scores:
        s[s == 0] = 0.5
    scores[1][123] = 0.0
    counts, indices = select_pivots_triton(scores, 3 * n - 1)
    assert counts.tolist() == [n, n - 1, n]
    assert indices[n + 122].item() == 122 and indices[n + 123].item() == 124
    assert indices[-1].item() == n - 1 and indices[2 * n - 1].item() == 0


# ---------------------------------------------------------------------------------------------------------------------
# select_pivots


def _check_selection(scores, k, **kw):
    from ppt_fast.kernels.triton.select_pivots import select_pivots_triton

    counts, indices = select_pivots_triton(scores, k, **kw)
    ref_counts, ref_indices = _select_pivots_ref(scores, k)
    assert counts.dtype == torch.int64 and indices.dtype == torch.int32 and indices.shape == (k,)
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    assert torch.equal(indices.cpu(), ref_indices.cpu())
    # torch.topk as an independent oracle for the selected magnitudes (ties make the index sets ambiguous).
    flat = torch.cat([s.detach().float().abs().reshape(-1).cpu() for s in scores])
    base = torch.cumsum(torch.tensor([0] + [s.numel() for s in scores[:-1]]), 0)
    owner = torch.repeat_interleave(torch.arange(len(scores)), counts.cpu())
    global_idx = base[owner] + indices.cpu().long()
    picked = flat[global_idx].sort(descending=True).values
    torch.testing.assert_close(picked, torch.topk(flat, k).values, rtol=0, atol=0)
    for i in range(len(scores)):  # sorted within each tensor
        local = indices.cpu()[owner == i]
        assert bool((local[1:] > local[:-1]).all())
    return counts, indices


# Selection works on bit patterns only (bf16 keys are widened integer bits), so bf16 runs in the interpreter too.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 300, 1395])  # 1395 = N: everything
def test_select_pivots_matches_reference(dtype, k):
    scores = [_rand(s, dtype) for s in SHAPES]
    scores[0] = scores[0] * 1e-3  # a tensor that gets no pivot at small k
    _check_selection(scores, k, block=128, steps=2)


def test_select_pivots_ties_in_global_order():
    """Few distinct values: the threshold bin is full of ties, handed out across tiles and tensors in order."""
    scores = [torch.randint(-3, 4, s, device=DEVICE).float() for s in SHAPES]
    total = sum(s.numel() for s in scores)
    for k in (3, 777, total - 1):
        _check_selection(scores, k, block=64, steps=3)
    every_tie = [torch.full(s, -2.5, device=DEVICE) for s in SHAPES]
    counts, indices = _check_selection(every_tie, 100, block=64, steps=2)
    assert counts.tolist()[:3] == [1, 91, 8]


def test_select_pivots_edge_values_and_k_bounds():
    """±0, subnormals, ±inf, negative scores (signed sgd_delta buffers); k = 0 and k = N."""
    s = _rand((500,), torch.float32)
    s[:6] = torch.tensor([0.0, -0.0, 1e-45, -3e-39, float("inf"), -float("inf")])
    scores = [s, _rand((77,), torch.float32) * 1e-40]
    total = 577
    for k in (1, 3, 250, total):
        _check_selection(scores, k, block=128, steps=1)
    from ppt_fast.kernels.triton.select_pivots import select_pivots_triton

    counts, indices = select_pivots_triton(scores, 0)
    assert counts.tolist() == [0, 0] and indices.numel() == 0


def test_select_pivots_mixed_dtypes_default_config():
    """fp16 and fp32 score tensors together (two dtype groups writing into one output), default tile config."""
    scores = [_rand((700,), torch.float16), _rand((300,), torch.float32), _rand((1200,), torch.float16)]
    _check_selection(scores, 123)


def test_select_pivots_nan_raises():
    from ppt_fast.kernels.triton.select_pivots import select_pivots_triton

    scores = [_rand((40,), torch.float32), _rand((300,), torch.float16)]
    scores[1][257] = float("nan")
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        select_pivots_triton(scores, 5, block=64)
    with _backend.force("triton"), pytest.raises(ValueError, match=r"NaN scores in tensor\(s\) \['b'\]"):
        ppt_fast.select_pivots(scores, count=5, names=["a", "b"])


def test_select_pivots_public_op():
    scores = {"w": _rand((64, 17), torch.float32), "v": _rand((5,), torch.float32), "u": _rand((300,), torch.float32)}
    with _backend.force("triton"):
        got = ppt_fast.select_pivots(scores, ratio=0.05)
    want = ppt_fast.select_pivots({n: s.cpu() for n, s in scores.items()}, ratio=0.05)
    assert got.names == want.names and torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.indices.cpu(), want.indices)


# ---------------------------------------------------------------------------------------------------------------------
# sparse_adamw_step

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _pivot_problem(param_dtypes, counts, shapes=None):
    shapes = shapes or [(1,), (7, 13), (1031,), (50,)][: len(counts)]
    assert all(c <= math.prod(s) for c, s in zip(counts, shapes)), "more pivots than entries"
    params = [_rand(s, d) for s, d in zip(shapes, param_dtypes)]
    grads = [_rand(s, d) for s, d in zip(shapes, param_dtypes)]
    idx = [torch.randperm(p.numel())[:c].sort().values.to(torch.int32) for p, c in zip(params, counts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    indices = torch.cat(idx).to(DEVICE)
    k = offsets[-1]
    exp_avg = _rand((k,), torch.float32, 0.1)
    exp_avg_sq = _rand((k,), torch.float32, 0.1).square()
    low = any(d != torch.float32 for d in param_dtypes)
    master = torch.cat([p.reshape(-1)[i.long().to(DEVICE)].float() for p, i in zip(params, idx)]) if low else None
    if master is not None:
        master += _rand((k,), torch.float32, 1e-3)  # master is authoritative: make it differ from the params
    return params, grads, offsets, indices, exp_avg, exp_avg_sq, master


def _clone(xs):
    return [None if x is None else [t.clone() for t in x] if isinstance(x, list) else x.clone() for x in xs]


def _pivot_mask(params, offsets, indices):
    masks = []
    for i, p in enumerate(params):
        m = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        m[indices[offsets[i] : offsets[i + 1]].long()] = True
        masks.append(m)
    return masks


@pytest.mark.parametrize(
    "dtypes,variant",
    [
        ((torch.float32,) * 4, "dense"),
        ((torch.float32,) * 4, "pivot_grads"),
        ((torch.float32,) * 4, "grad_scale"),
        ((torch.float16, torch.float32, torch.float16, torch.float16), "dense"),  # fp16 + master, two dtype groups
        ((torch.float16,) * 4, "pivot_grads"),
        pytest.param((torch.bfloat16,) * 4, "dense", marks=needs_gpu),
        pytest.param((torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16), "grad_scale", marks=needs_gpu),
    ],
)
def test_sparse_adamw_step_matches_reference(dtypes, variant):
    from ppt_fast.kernels.triton.sparse_adamw_step import sparse_adamw_step_triton

    counts = [1, 20, 0, 50]  # tensor 2 holds no pivot
    params, grads, offsets, indices, m, v, master = _pivot_problem(dtypes, counts)
    pivot_grads = None
    grad_list = grads
    if variant == "pivot_grads":
        pivot_grads = torch.cat([g.reshape(-1)[indices[a:b].long()] for g, a, b in zip(grads, offsets, offsets[1:])])
        grad_list = []
    grad_scale = torch.tensor([1024.0], device=DEVICE) if variant == "grad_scale" else None
    found_inf = torch.zeros(1, device=DEVICE) if variant == "grad_scale" else None
    before = [p.clone() for p in params]
    mine = _clone([params, m, v, master])
    ref = _clone([params, m, v, master])
    for step in (1, 2, 3):
        args = (offsets, indices)
        tail = (pivot_grads, grad_scale, found_inf, None, None, *HYPER.values(), step)
        sparse_adamw_step_triton(mine[0], grad_list, *args, mine[1], mine[2], mine[3], *tail, tile=16)
        _sparse_adamw_step_ref(ref[0], grad_list, *args, ref[1], ref[2], ref[3], *tail)
    for got, want, p0, pivot in zip(mine[0], ref[0], before, _pivot_mask(params, offsets, indices)):
        # One ulp of the stored dtype where the two round a value that sits on a rounding boundary differently.
        torch.testing.assert_close(got, want, **tol(got.dtype))
        assert torch.equal(got.reshape(-1)[~pivot], p0.reshape(-1)[~pivot]), "a non-pivot entry changed"
        assert not torch.equal(got.reshape(-1)[pivot], p0.reshape(-1)[pivot]) or not pivot.any()
    for got, want in zip(mine[1:], ref[1:]):
        if want is not None:
            torch.testing.assert_close(got, want, **tol(torch.float32))


def test_sparse_adamw_step_several_steps_vs_fp64_adamw():
    """Five steps against torch.optim.AdamW in fp64 on the pivot values (fp16 params with an fp32 master)."""
    from ppt_fast.kernels.triton.sparse_adamw_step import sparse_adamw_step_triton

    dtypes = (torch.float16, torch.float16, torch.float16)
    params, _, offsets, indices, _, _, master = _pivot_problem(dtypes, [1, 40, 33])
    k = offsets[-1]
    m, v = torch.zeros(k, device=DEVICE), torch.zeros(k, device=DEVICE)
    theta64 = master.double().cpu().clone().requires_grad_(True)
    opt = torch.optim.AdamW([theta64], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"])  # fmt: skip
    for step in range(1, 6):
        pivot_grads = _rand((k,), torch.float32)
        sparse_adamw_step_triton(
            params, [], offsets, indices, m, v, master, pivot_grads, *([None] * 4), *HYPER.values(), step, tile=32
        )
        theta64.grad = pivot_grads.double().cpu()
        opt.step()
    state = opt.state[theta64]
    torch.testing.assert_close(master.double().cpu(), theta64.detach(), rtol=ADAMW_FP32[0], atol=ADAMW_FP32[1])
    torch.testing.assert_close(m.double().cpu(), state["exp_avg"], rtol=ADAMW_FP32[0], atol=ADAMW_FP32[1])
    torch.testing.assert_close(v.double().cpu(), state["exp_avg_sq"], rtol=ADAMW_FP32[0], atol=ADAMW_FP32[1])
    # the fp16 params hold the master rounded once
    for i, p in enumerate(params):
        sel = indices[offsets[i] : offsets[i + 1]].long()
        assert torch.equal(p.reshape(-1)[sel], master[offsets[i] : offsets[i + 1]].to(p.dtype))


def test_sparse_adamw_step_small_beta1_uses_lerp_from_end():
    """beta1 < 0.5 makes lerp's weight >= 0.5, where torch.lerp switches formula; the kernel must follow."""
    from ppt_fast.kernels.triton.sparse_adamw_step import sparse_adamw_step_triton

    params, grads, offsets, indices, m, v, _ = _pivot_problem((torch.float32,) * 2, [1, 60])
    hyper = dict(HYPER, beta1=0.2)
    ref = _clone([params, m, v])
    sparse_adamw_step_triton(params, grads, offsets, indices, m, v, *([None] * 6), *hyper.values(), 2)
    _sparse_adamw_step_ref(ref[0], grads, offsets, indices, ref[1], ref[2], *([None] * 6), *hyper.values(), 2)
    for got, want in zip(params + [m, v], ref[0] + ref[1:]):
        torch.testing.assert_close(got, want, **tol(torch.float32))


def test_sparse_adamw_step_found_inf_skips_everything():
    from ppt_fast.kernels.triton.sparse_adamw_step import sparse_adamw_step_triton

    params, grads, offsets, indices, m, v, master = _pivot_problem((torch.float16, torch.float32), [1, 30])
    before = _clone([params, m, v, master])
    found_inf = torch.ones(1, device=DEVICE)
    grad_scale = torch.full((1,), 65536.0, device=DEVICE)
    sparse_adamw_step_triton(
        params, grads, offsets, indices, m, v, master, None, grad_scale, found_inf, None, None, *HYPER.values(), 1,
        tile=16,
    )
    for got, want in zip(params + [m, v, master], before[0] + before[1:]):
        assert torch.equal(got, want)


def test_sparse_adamw_step_public_op():
    params, grads, offsets, indices, m, v, _ = _pivot_problem((torch.float32,) * 3, [1, 17, 300])
    ref = _clone([params, m, v])
    with _backend.force("triton"):
        ppt_fast.sparse_adamw_step(params, grads, offsets, indices, m, v, step=4, **HYPER)
    _sparse_adamw_step_ref(ref[0], grads, offsets, indices, ref[1], ref[2], *([None] * 6), *HYPER.values(), 4)
    for got, want in zip(params + [m, v], ref[0] + ref[1:]):
        torch.testing.assert_close(got, want, **tol(torch.float32))


def test_sparse_adamw_step_reuses_tables_across_steps():
    """The same PivotSet every step: the tile table is built once and served from the cache after."""
    from ppt_fast.kernels.triton import _utils
    from ppt_fast.kernels.triton.sparse_adamw_step import sparse_adamw_step_triton

    params, grads, offsets, indices, m, v, _ = _pivot_problem((torch.float32,) * 2, [1, 9])
    ref = _clone([params, m, v])
    for step in (1, 2):
        sparse_adamw_step_triton(params, grads, offsets, indices, m, v, *([None] * 6), *HYPER.values(), step)
        _sparse_adamw_step_ref(ref[0], grads, offsets, indices, ref[1], ref[2], *([None] * 6), *HYPER.values(), step)
        if step == 1:
            tables = dict(_utils._block_tables._items)
    assert dict(_utils._block_tables._items).keys() == tables.keys()
    assert all(_utils._block_tables._items[key] is value for key, value in tables.items())
    for got, want in zip(params, ref[0]):
        torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("variant", ["dense", "pivot_grads", "fp16_master"])
def test_sparse_adamw_step_checked_with_coef_matches_reference(variant):
    """The checked step (gather + check launch, then the update from the scratch) with a clipping coefficient and a
    grad scale, against the reference; a NaN at one pivot then leaves everything untouched and raises the flag."""
    from ppt_fast.kernels.triton.sparse_adamw_step import sparse_adamw_step_triton

    dtypes = (torch.float16, torch.float32, torch.float16, torch.float16) if variant == "fp16_master" else None
    params, grads, offsets, indices, m, v, master = _pivot_problem(dtypes or (torch.float32,) * 4, [1, 20, 0, 50])
    pivot_grads, grad_list = None, grads
    if variant == "pivot_grads":
        pivot_grads = torch.cat([g.reshape(-1)[indices[a:b].long()] for g, a, b in zip(grads, offsets, offsets[1:])])
        grad_list = []
    scale, coef = torch.tensor([4.0], device=DEVICE), torch.tensor([0.37], device=DEVICE)
    mine, ref = _clone([params, m, v, master]), _clone([params, m, v, master])
    flags = [torch.zeros(1, device=DEVICE), torch.zeros(1, device=DEVICE)]
    for step in (1, 2):
        tail = (pivot_grads, scale, None, coef)
        sparse_adamw_step_triton(mine[0], grad_list, offsets, indices, *mine[1:], *tail, flags[0], *HYPER.values(),
                                 step, tile=16)  # fmt: skip
        _sparse_adamw_step_ref(ref[0], grad_list, offsets, indices, *ref[1:], *tail, flags[1], *HYPER.values(), step)
    assert float(flags[0]) == float(flags[1]) == 0.0
    for got, want in zip(mine[0] + mine[1:], ref[0] + ref[1:]):
        if want is not None:
            torch.testing.assert_close(got, want, **tol(got.dtype))
    if pivot_grads is not None:
        pivot_grads[-1] = float("inf")
    else:
        grads[-1].view(-1)[indices[-1].long()] = float("nan")
    before = _clone(mine)
    sparse_adamw_step_triton(mine[0], grad_list, offsets, indices, *mine[1:], pivot_grads, scale, None, coef, flags[0],
                             *HYPER.values(), 3, tile=16)  # fmt: skip
    assert float(flags[0]) == 1.0
    for got, want in zip(mine[0] + mine[1:], before[0] + before[1:]):
        if want is not None:
            assert torch.equal(got, want)


@pytest.mark.parametrize("checked", [False, True])
def test_sparse_adamw_step_masks_indices_outside_the_tensor(checked):
    """The raw launcher (no Python checks) given an index past the end of params[0] and one of -1: the neighbour
    in the same storage stays bitwise unchanged (before the mask, index 20 of a 16-entry tensor changed it)."""
    from ppt_fast.kernels.triton.sparse_adamw_step import sparse_adamw_step_triton

    storage = _rand((16 + 40 + 8,), torch.float32)
    params = [storage[:16], storage[16:56]]
    grads = [_rand((16,), torch.float32), _rand((40,), torch.float32)]
    indices = torch.tensor([2, 5, 20, 1, 7, -1], dtype=torch.int32, device=DEVICE)  # 20: in params[1]'s storage
    offsets = [0, 3, 6]
    saved = storage.clone()
    m, v = torch.zeros(6, device=DEVICE), torch.zeros(6, device=DEVICE)
    flag = torch.zeros(1, device=DEVICE) if checked else None
    sparse_adamw_step_triton(params, grads, offsets, indices, m, v, None, None, None, None, None, flag,
                             *HYPER.values(), 1, tile=16)  # fmt: skip
    changed = (storage != saved).nonzero().reshape(-1).tolist()
    assert set(changed) == {2, 5, 16 + 1, 16 + 7}  # the four valid pivots and nothing else


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("gathered", [False, True])
def test_pivot_grad_norm_matches_reference(norm_type, gathered):
    from ppt_fast.kernels.triton.pivot_grad_norm import pivot_grad_norm_triton
    from ppt_fast.ops.pivot_grad_norm import _pivot_grad_norm_ref

    dtypes = (torch.float16, torch.float32, torch.float32, torch.float16)
    params, grads, offsets, indices, *_ = _pivot_problem(dtypes, [1, 20, 0, 50])
    pg = None
    if gathered:
        pg = torch.cat([g.reshape(-1)[indices[a:b].long()].float() for g, a, b in zip(grads, offsets, offsets[1:])])
    got = pivot_grad_norm_triton([] if gathered else grads, offsets, indices, pg, norm_type, tile=16)
    want = _pivot_grad_norm_ref(grads, offsets, indices, pg, norm_type)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0.0)  # fp32 tile partials vs fp64 accumulation
    for bad, expect in ((float("inf"), math.inf), (float("nan"), None)):
        g2 = [g.clone() for g in grads]
        g2[1].view(-1)[indices[offsets[1]].long()] = bad
        got = float(pivot_grad_norm_triton(g2, offsets, indices, None, norm_type, tile=16))
        assert (got == expect) if expect is not None else math.isnan(got)


def test_sparse_adamw_optimizer_on_triton_matches_ref():
    """SparseAdamW as users call it (grads in p.grad, the default check, clipping) on the Triton backend against the
    ref backend, step by step; a NaN step is skipped by both (read one step late on a GPU) and the step counts agree."""
    import copy

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5)).to(DEVICE)
    masks = {n: torch.rand(p.shape, device=DEVICE) < 0.3 for n, p in model.named_parameters()}
    pivots = ppt_fast.PivotSet.from_masks(masks)
    runs = []
    for backend in ("ref", "triton"):
        m = copy.deepcopy(model)
        opt = ppt_fast.SparseAdamW(m, pivots, lr=1e-2)
        torch.manual_seed(4)
        with _backend.force(backend):
            for i in range(4):
                opt.zero_grad()
                x = torch.randn(8, 13, device=DEVICE)
                m(x).square().mean().backward()
                if i == 2:
                    m[0].weight.grad.view(-1)[pivots.indices_of("0.weight")[0].long()] = float("nan")
                opt.clip_grad_norm_(0.05)
                opt.step()
            assert opt.skipped_steps == 1 and opt._gstate[0]["step"] == 3
        runs.append(m)
    for (n, a), (_, b) in zip(runs[0].named_parameters(), runs[1].named_parameters()):
        torch.testing.assert_close(a, b, **tol(torch.float32), msg=n)


# ---------------------------------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, functionalization of the public ops with the Triton backend underneath


def test_opcheck_sensitivity_accumulate():
    scores = [_rand((33,), torch.float32), _rand((4, 5), torch.float32)]
    grads = [_rand((33,), torch.float32), _rand((4, 5), torch.float32)]
    with _backend.force("triton"):
        torch.library.opcheck(torch.ops.ppt_fast.sensitivity_accumulate.default, (scores, grads, [], "grad_abs"))


def test_opcheck_select_pivots_packed():
    scores = [_rand((33,), torch.float32), _rand((4, 5), torch.float32)]
    with _backend.force("triton"):
        torch.library.opcheck(torch.ops.ppt_fast.select_pivots_packed.default, (scores, 7))


def test_opcheck_sparse_adamw_step():
    params, grads, offsets, indices, m, v, _ = _pivot_problem((torch.float32,) * 2, [1, 11])
    args = (params, grads, offsets, indices, m, v, None, None, None, None, None, None, *HYPER.values(), 1)
    with _backend.force("triton"):
        torch.library.opcheck(torch.ops.ppt_fast.sparse_adamw_step.default, args)
    coef, flag = torch.tensor([0.25], device=DEVICE), torch.zeros(1, device=DEVICE)
    args = (params, grads, offsets, indices, m, v, None, None, None, None, coef, flag, *HYPER.values(), 2)
    with _backend.force("triton"):
        torch.library.opcheck(torch.ops.ppt_fast.sparse_adamw_step.default, args)


# ---------------------------------------------------------------------------------------------------------------------
# Compile check for a GPU without a GPU: lower every kernel to PTX + cubin for sm_90 with the installed Triton.

_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ppt_fast.kernels.triton import pivot_grad_norm as N, select_pivots as P, sensitivity_accumulate as S
from ppt_fast.kernels.triton import sparse_adamw_step as A

def compile(fn, sig, const, warps):
    sig = {**sig, **{k: "constexpr" for k in const}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "enable_fp_fusion": False})
    assert out.asm["cubin"], fn

tab = {"score_tab": "*i64", "grad_tab": "*i64", "param_tab": "*i64", "blk_tid": "*i32", "blk_start": "*i64",
       "numels": "*i64"}
for mode, (sd, gd) in [(0, ("fp32", "fp16")), (2, ("bf16", "bf16"))]:
    sig = {**tab, "s_like": "*" + sd, "g_like": "*" + gd, "p_like": "*" + gd}
    compile(S._sensitivity_accumulate_kernel, sig, {"MODE": mode, "ALIGNED": True, "TILE": S._TILE_GPU}, S._WARPS_GPU)
sel = {"blk_ids": "*i32", "score_tab": "*i64", "like": "*i16", "blk_tid": "*i32", "blk_start": "*i64",
       "numels": "*i64", "state": "*i64"}
steps = {"CODE": 2, "BLOCK": P._BLOCK_GPU, "STEPS": P._STEPS_GPU}
for shift, bins, prefix_shift in P._PASSES[:2]:
    compile(P._radix_histogram_kernel, {**sel, "hist": "*i64", "nan_flag": "*i32"},
            {**steps, "SHIFT": shift, "BINS": bins, "PREFIX_SHIFT": prefix_shift}, P._WARPS_GPU)
compile(P._threshold_count_kernel, {**sel, "blk_gt": "*i64", "blk_eq": "*i64"}, steps, P._WARPS_GPU)
compile(P._compact_kernel, {**sel, "blk_out": "*i64", "blk_eq_before": "*i64", "out": "*i32", "counts": "*i64"},
        steps, P._WARPS_GPU)
sig = {"param_tab": "*i64", "grad_tab": "*i64", "p_like": "*bf16", "g_like": "*bf16", "pivot_grads": "*bf16",
       "blk_tid": "*i32", "blk_start": "*i64", "offsets": "*i64", "indices": "*i32", "exp_avg": "*fp32",
       "exp_avg_sq": "*fp32", "master": "*fp32", "grad_scale": "*fp32", "found_inf": "*fp32", "grad_coef": "*fp32",
       "nonfinite": "*fp32", "numel_tab": "*i64",
       **{k: "fp32" for k in ("decay", "m_weight", "beta2", "v_weight", "eps", "neg_step_size",
                              "bias_correction2_sqrt")}}
for flags in (True, False):
    compile(A._sparse_adamw_step_kernel, sig, {"PIVOT_GRADS": flags, "HAS_MASTER": flags, "HAS_SCALE": flags,
            "HAS_FOUND_INF": flags, "HAS_COEF": flags, "SKIP_ON_FLAG": flags, "LERP_FROM_END": not flags,
            "TILE": A._TILE_GPU}, A._WARPS_GPU)
sig = {"grad_tab": "*i64", "g_like": "*bf16", "pivot_grads": "*bf16", "blk_tid": "*i32", "blk_start": "*i64",
       "offsets": "*i64", "indices": "*i32", "numel_tab": "*i64", "out": "*fp32", "grad_scale": "*fp32",
       "found_inf": "*fp32", "grad_coef": "*fp32", "nonfinite": "*fp32"}
for flags in (True, False):
    compile(A._gather_check_kernel, sig, {"PIVOT_GRADS": flags, "HAS_SCALE": flags, "HAS_FOUND_INF": flags,
            "HAS_COEF": flags, "TILE": A._TILE_GPU}, A._WARPS_GPU)
sig = {"grad_tab": "*i64", "g_like": "*fp16", "pivot_grads": "*fp32", "blk_tid": "*i32", "blk_start": "*i64",
       "offsets": "*i64", "indices": "*i32", "numel_tab": "*i64", "partial": "*fp32", "bad": "*i32", "p": "fp32"}
for kind in range(4):
    compile(N._pivot_grad_norm_kernel, sig, {"PIVOT_GRADS": kind == 1, "KIND": kind, "TILE": N._TILE_GPU},
            N._WARPS_GPU)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Catches GPU-only compile errors (layouts, histogram lowering, pointer casts) on a machine without a GPU."""
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        pytest.skip(f"triton {triton.__version__} has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
