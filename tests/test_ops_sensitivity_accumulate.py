"""sensitivity_accumulate on every backend against the fp64 reference math (and the PyTorch reference)."""

from __future__ import annotations

import pytest
import torch
from _op_cases import AWKWARD_SHAPES, FLOAT_DTYPES, REALISTIC_SHAPES, backend_params, randn, strided_view, use_backend
from tolerances import tol

from ppt_fast.ops import MODES, sensitivity_accumulate
from ppt_fast.ops.sensitivity_accumulate import _sensitivity_accumulate_ref

OP = "sensitivity_accumulate"
BACKENDS = backend_params(OP)
SCORE_DTYPES = (torch.float32, torch.bfloat16)


def _expected(scores, grads, params, mode: str) -> list[torch.Tensor]:
    """The contract in fp64 on CPU: s + f(g, θ), rounded once into the score dtype."""
    out = []
    for i, (s, g) in enumerate(zip(scores, grads)):
        g64 = g.detach().cpu().double()
        if mode == "grad_sq":
            upd = g64 * g64
        elif mode == "grad_abs":
            upd = g64.abs()
        elif mode == "taylor":
            upd = (g64 * params[i].detach().cpu().double()).abs()
        else:
            upd = g64
        out.append((s.detach().cpu().double() + upd).to(s.dtype))
    return out


def _make(shapes, score_dtype, grad_dtype, device, mode, strided=False):
    # Initial scores are random (never zeros), signed for sgd_delta (a signed running sum), else non-negative.
    scores = [randn(s, torch.float32, device).abs().to(score_dtype) for s in shapes]
    if mode == "sgd_delta":
        scores = [randn(s, score_dtype, device) for s in shapes]
    make = strided_view if strided else randn
    grads = [make(s, grad_dtype, device) for s in shapes]
    params = [make(s, grad_dtype, device) for s in shapes] if mode == "taylor" else None
    return scores, grads, params


def _check(scores, expected):
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got.cpu().double(), want.double(), **tol(got.dtype))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("score_dtype", SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", FLOAT_DTYPES, ids=str)
def test_awkward_shapes_all_dtypes(backend, device, mode, score_dtype, grad_dtype):
    with use_backend(OP, backend, device) as dev:
        scores, grads, params = _make(AWKWARD_SHAPES, score_dtype, grad_dtype, dev, mode)
        expected = _expected(scores, grads, params, mode)
        sensitivity_accumulate(scores, grads, params=params, mode=mode)
    _check(scores, expected)


# One score dtype per mode keeps the realistic shapes (11.5 M entries) cheap; the awkward shapes cover the full grid.
REALISTIC_SCORE_DTYPE = {
    "grad_sq": torch.bfloat16,
    "grad_abs": torch.float32,
    "taylor": torch.bfloat16,
    "sgd_delta": torch.float32,
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_realistic_shapes(backend, device, mode):
    """The reference is checked against fp64; every other backend against the reference: fp32 math rounded once
    gives the same bits for bf16 scores, and agreement within the fp32 tolerance (FMA contraction may differ)
    for fp32 scores."""
    score_dtype = REALISTIC_SCORE_DTYPE[mode]
    with use_backend(OP, backend, device) as dev:
        scores, grads, params = _make(REALISTIC_SHAPES, score_dtype, torch.bfloat16, dev, mode)
        if backend == "ref":
            expected = _expected(scores, grads, params, mode)
        else:
            expected = [s.clone() for s in scores]
            _sensitivity_accumulate_ref(expected, grads, params, mode)
        sensitivity_accumulate(scores, grads, params=params, mode=mode)
    if backend == "ref":
        _check(scores, expected)
        return
    for got, want in zip(scores, expected):
        if score_dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, **tol(score_dtype))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["grad_sq", "taylor"])
def test_strided_grads_and_params(backend, device, mode):
    with use_backend(OP, backend, device) as dev:
        scores, grads, params = _make([(33, 17), (1024, 7)], torch.float32, torch.float16, dev, mode, strided=True)
        expected = _expected(scores, grads, params, mode)
        sensitivity_accumulate(scores, grads, params=params, mode=mode)
    _check(scores, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_accumulates_over_steps_and_repeated_tensor(backend, device):
    """Several calls add up; the same grad tensor may feed several scores."""
    with use_backend(OP, backend, device) as dev:
        scores = [randn((257, 3), torch.float32, dev).abs(), randn((5,), torch.bfloat16, dev).abs()]
        want = [s.cpu().double() for s in scores]
        for _ in range(3):
            g = randn((257, 3), torch.float32, dev)
            grads = [g, randn((5,), torch.float32, dev)]
            sensitivity_accumulate(scores, grads, mode="grad_abs")
            want = [w + gr.cpu().double().abs() for w, gr in zip(want, grads)]
            want = [w.to(s.dtype).double() for w, s in zip(want, scores)]  # the score is rounded at every call
    _check(scores, [w.to(s.dtype) for w, s in zip(want, scores)])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_list_and_empty_tensor(backend, device):
    with use_backend(OP, backend, device) as dev:
        sensitivity_accumulate([], [], mode="grad_sq")
        s = [torch.zeros(0, device=dev), randn((3,), torch.float32, dev).abs()]
        g = [torch.zeros(0, device=dev), randn((3,), torch.float32, dev)]
        expected = _expected(s, g, None, "grad_sq")
        sensitivity_accumulate(s, g)
    _check(s, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_pattern_widens_exactly(backend, device, dtype):
    """All 65536 fp16 / bf16 bit patterns (subnormals, infinities, NaNs included) as signed grads into zero fp32
    scores: the score must equal the exact fp32 value of the grad."""
    with use_backend(OP, backend, device) as dev:
        g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(dev)
        s = [torch.zeros(g.numel(), device=dev)]
        sensitivity_accumulate(s, [g], mode="sgd_delta")
    torch.testing.assert_close(s[0].cpu(), g.cpu().float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_gradients_reach_the_scores(backend, device):
    """A NaN gradient must poison its score (bf16 rounding included) so that select_pivots can report it."""
    with use_backend(OP, backend, device) as dev:
        for dtype in SCORE_DTYPES:
            s = [torch.ones(70000, dtype=dtype, device=dev)]
            g = torch.ones(70000, device=dev)
            g[69999] = float("nan")
            sensitivity_accumulate(s, [g])
            assert torch.isnan(s[0][69999]) and not torch.isnan(s[0][:69999]).any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    with use_backend(OP, backend, device) as dev:
        for mode in MODES:
            scores, grads, params = _make([(5, 3), (11,)], torch.float32, torch.bfloat16, dev, mode)
            torch.library.opcheck(
                torch.ops.ppt_fast.sensitivity_accumulate.default, (scores, grads, params or [], mode)
            )


def test_bad_inputs_raise_clear_errors():
    s = [torch.zeros(4, 3)]
    g = [torch.randn(4, 3)]
    with pytest.raises(ValueError, match="not one of"):
        sensitivity_accumulate(s, g, mode="fisher")
    with pytest.raises(ValueError, match="scores has 1 tensors but grads has 2"):
        sensitivity_accumulate(s, g + g)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3, 4\)"):
        sensitivity_accumulate(s, [torch.randn(3, 4)])
    with pytest.raises(TypeError, match=r"scores\[0\] has dtype float16"):
        sensitivity_accumulate([torch.zeros(4, 3, dtype=torch.float16)], g)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype int64"):
        sensitivity_accumulate(s, [torch.ones(4, 3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="is on meta"):
        sensitivity_accumulate(s, [torch.randn(4, 3, device="meta")])
    with pytest.raises(ValueError, match="needs params"):
        sensitivity_accumulate(s, g, mode="taylor")
    with pytest.raises(ValueError, match=r"scores\[0\] is not contiguous"):
        sensitivity_accumulate([torch.zeros(3, 4).t()], g)
    with pytest.raises(TypeError, match="single tensor"):
        sensitivity_accumulate(s[0], g)
    with pytest.raises(ValueError, match="is None"):
        sensitivity_accumulate(s, [None])


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpp"])
def test_cpp_kernel_checks_its_own_inputs(backend, device):
    """The private op is callable directly; it must refuse what would make it read or write out of bounds."""
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.ppt_fast._sensitivity_accumulate_cpp([torch.zeros(3, 4).t()], [torch.randn(4, 3)], [], 0)
    with pytest.raises(RuntimeError, match="has shape"):
        torch.ops.ppt_fast._sensitivity_accumulate_cpp([torch.zeros(4, 3)], [torch.randn(3, 3)], [], 0)
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.ppt_fast._sensitivity_accumulate_cpp([torch.zeros(4, 3)], [torch.randn(4, 3)], [], 7)
    with pytest.raises(RuntimeError, match="needs one param"):
        torch.ops.ppt_fast._sensitivity_accumulate_cpp([torch.zeros(4, 3)], [torch.randn(4, 3)], [], 2)
