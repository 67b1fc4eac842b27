"""pivot_grad_norm on every backend: the norm of the gradients at the pivots against torch.linalg.vector_norm in fp64
over the gathered values; NaN/inf propagation; bad input; opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from _op_cases import AWKWARD_SHAPES, REALISTIC_SHAPES, backend_params, randn, strided_view, use_backend

from ppt_fast import PivotError, PivotSet
from ppt_fast.ops import pivot_grad_norm

OP = "pivot_grad_norm"
BACKENDS = backend_params(OP)
NORMS = [2.0, 1.0, math.inf, 3.0, 0.5]


def _case(shapes, dtypes, dev, density):
    grads = [randn(s, dt, dev, scale=3.0) for s, dt in zip(shapes, dtypes)]
    masks = [torch.rand(s) < density for s in shapes]
    for m in masks:  # at least one pivot per tensor but the last, which gets none (an empty tensor slot)
        m.view(-1)[0] = True
    masks[-1].zero_()
    ps = PivotSet.from_masks(masks).to(dev)
    gathered = torch.cat([g.reshape(-1)[m.reshape(-1).to(dev)].double() for g, m in zip(grads, masks)])
    return grads, ps, gathered


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_vector_norm(backend, device, norm_type, dtype):
    with use_backend(OP, backend, device) as dev:
        shapes = AWKWARD_SHAPES + REALISTIC_SHAPES[:1]
        grads, ps, gathered = _case(shapes, [dtype] * len(shapes), dev, 0.02)
        want = torch.linalg.vector_norm(gathered, norm_type)
        got = pivot_grad_norm(grads, ps.offsets_list, ps.indices, norm_type=norm_type)
        assert got.dtype == torch.float32 and got.shape == () and got.device == dev
        # fp64 accumulation (cpp, ref) rounded once to fp32
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0.0)
        gathered_pg = torch.cat([g.reshape(-1)[i.long()] for g, (_, i) in zip(grads, ps)])
        got_pg = pivot_grad_norm(None, ps.offsets_list, ps.indices, pivot_grads=gathered_pg, norm_type=norm_type)
        torch.testing.assert_close(got_pg.double(), want, rtol=2e-6, atol=0.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_and_inf_propagate_and_strided_grads(backend, device):
    with use_backend(OP, backend, device) as dev:
        shapes = [(13, 17), (65537,), (4,)]
        grads, ps, gathered = _case(shapes, [torch.float32] * 3, dev, 0.05)
        grads[0] = strided_view((13, 17), torch.float32, dev)  # read-only input: a strided view is copied
        gathered = torch.cat(
            [g.reshape(-1)[i.long()].double() for g, (_, i) in zip(grads, ps) if i.numel()]
        )
        torch.testing.assert_close(
            pivot_grad_norm(grads, ps.offsets_list, ps.indices).double(), gathered.norm(), rtol=2e-6, atol=0.0
        )
        j = int(ps.indices_of(1)[0])
        for norm_type in NORMS:
            g = [x.clone() for x in grads]
            g[1].view(-1)[j] = float("inf")
            assert float(pivot_grad_norm(g, ps.offsets_list, ps.indices, norm_type=norm_type)) == math.inf
            g[0].view(-1)[int(ps.indices_of(0)[-1])] = float("nan")
            assert math.isnan(float(pivot_grad_norm(g, ps.offsets_list, ps.indices, norm_type=norm_type)))
        # a NaN at a non-pivot entry does not count
        g = [x.clone() for x in grads]
        nonpivot = int((~ps.to_masks()["1"].reshape(-1)).nonzero()[0])
        g[1].view(-1)[nonpivot] = float("nan")
        assert math.isfinite(float(pivot_grad_norm(g, ps.offsets_list, ps.indices)))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_pivots_gives_zero(backend, device):
    with use_backend(OP, backend, device) as dev:
        grads = [randn((5,), torch.float32, dev)]
        ps = PivotSet.empty(["0"], [(5,)], device=dev)
        assert float(pivot_grad_norm(grads, ps.offsets_list, ps.indices)) == 0.0


def test_bad_input_is_refused():
    grads = [torch.randn(10), torch.randn(4, 4)]
    ps = PivotSet.from_masks([torch.rand(10) < 0.5, torch.rand(4, 4) < 0.5])
    with pytest.raises(ValueError, match="norm_type"):
        pivot_grad_norm(grads, ps.offsets_list, ps.indices, norm_type=0)
    with pytest.raises(ValueError, match="exactly one of grads"):
        pivot_grad_norm(None, ps.offsets_list, ps.indices)
    with pytest.raises(ValueError, match="2 grads for 1 tensors"):
        pivot_grad_norm(grads, [0, ps.count], ps.indices)
    bad = ps.indices.clone()
    bad[-1] = 16
    with pytest.raises(PivotError, match=r"params\[1\]"):
        pivot_grad_norm(grads, ps.offsets_list, bad)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    with use_backend(OP, backend, device) as dev:
        grads, ps, _ = _case([(33, 5), (80,), (3,)], [torch.bfloat16, torch.float32, torch.float32], dev, 0.2)
        op = torch.ops.ppt_fast.pivot_grad_norm.default
        torch.library.opcheck(op, (grads, ps.offsets_list, ps.indices, None, 2.0))
        pg = torch.randn(ps.count, device=dev)
        torch.library.opcheck(torch.ops.ppt_fast.pivot_grad_norm.default, ([], ps.offsets_list, ps.indices, pg, 1.0))
