"""Row-scoped weight gradients (`ppt_fast.rowgrad`): blocks vs float64 autograd, input/bias gradients, activation
checkpointing, autocast, the sinks of SensitivityAccumulator and SparseAdamW, tune() with and without, bad uses."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

from ppt_fast.optim import SparseAdamW
from ppt_fast.pivots import PivotSet
from ppt_fast.rowgrad import RowGradError, RowGrads
from ppt_fast.sensitivity import SensitivityAccumulator

# A matmul over B*T = 35 products in fp32 vs float64: a few roundings of the sum.
MM_FP32 = {"rtol": 1e-5, "atol": 1e-6}


class Packed(torch.nn.Module):
    """Uses a packed [3d, d] weight the way audiocraft's attention does: whole (self) and as Q/K/V row slices
    (cross), then mixes the results so every row gets a gradient."""

    def __init__(self, d: int = 7, bias: bool = False) -> None:
        super().__init__()
        self.d = d
        self.w = torch.nn.Parameter(torch.randn(3 * d, d) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(3 * d) * 0.1) if bias else None
        self.w2 = torch.nn.Parameter(torch.randn(3 * d, d) * 0.3)
        self.mix = torch.nn.Parameter(torch.randn(3 * d, d) * 0.3)

    def forward(self, x, src):
        d = self.d
        h = torch.tanh(F.linear(x, self.w, self.b))  # self-attention style: the whole packed weight
        h = F.linear(h, self.mix.t())  # frozen mixing back to d
        q = F.linear(h, self.w2[:d])
        k = F.linear(src, self.w2[d : 2 * d])
        v = F.linear(src, self.w2[2 * d :])
        att = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return (att * torch.linspace(-1, 1, d)).sum() + (h**2).mean()


def _inputs(g, B=2, T=5, S=3, d=7, x_grad=True):
    x = torch.randn(B, T, d, generator=g).requires_grad_(x_grad)
    src = torch.randn(B, S, d, generator=g).requires_grad_(True)
    return x, src


def _float64_grads(model, x, src):
    m = Packed(model.d, bias=model.b is not None)
    m.load_state_dict(model.state_dict())
    m.double()
    x64, s64 = x.detach().double(), src.detach().double()
    params = [m.w, m.w2] + ([m.b] if m.b is not None else [])
    gs = torch.autograd.grad(m(x64, s64), params)
    return gs[0], gs[1]


def _step(rg, forward, *args, **kwargs):
    """``forward(*args, **kwargs)`` inside ``rg.forward()`` and its backward inside ``rg.backward()`` (rg
    installed)."""
    with rg.forward():
        loss = forward(*args, **kwargs)
    with rg.backward():
        loss.backward()


class Collect:
    def __init__(self, shape):
        self.full = torch.zeros(shape)
        self.blocks: list[tuple[int, int, int]] = []

    def __call__(self, block, row0, gen):
        self.full[row0 : row0 + block.shape[0]] += block
        self.blocks.append((row0, block.shape[0], gen))


@pytest.mark.parametrize("rows", [[(14, 21)], [(7, 21)], [(0, 1), (5, 21)], [(0, 21)], [(20, 21)]])
@pytest.mark.parametrize("bias", [False, True])
def test_blocks_match_float64_autograd(rows, bias):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = Packed(bias=bias)
    x, src = _inputs(g)
    gw64, gw2_64 = _float64_grads(model, x, src)
    cw, cw2 = Collect(model.w.shape), Collect(model.w2.shape)
    rg = RowGrads()
    rg.add("w", model.w, rows, cw)
    rg.add("w2", model.w2, rows, cw2)
    with rg:
        _step(rg, model, x, src)
    assert model.w.grad is None and model.w2.grad is None  # nothing whole was computed
    mask = torch.zeros(21, dtype=torch.bool)
    for a, b in rows:
        mask[a:b] = True
    for c, want in ((cw, gw64), (cw2, gw2_64)):
        torch.testing.assert_close(c.full[mask], want[mask].float(), **MM_FP32)
        assert torch.count_nonzero(c.full[~mask]) == 0  # rows not asked for are never delivered
        for row0, n, gen in c.blocks:
            assert mask[row0 : row0 + n].all() and gen == 1


@pytest.mark.parametrize("bias", [False, True])
def test_input_and_bias_gradients_equal_plain_autograd(bias):
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(3)
    model = Packed(bias=bias)
    x, src = _inputs(g)
    for p in (model.w, model.w2, model.mix):
        p.requires_grad_(False)
    if bias:
        model.b.requires_grad_(True)
    model(x, src).backward()
    want = [x.grad.clone(), src.grad.clone()] + ([model.b.grad.clone()] if bias else [])
    x.grad = src.grad = None
    if bias:
        model.b.grad = None
    rg = RowGrads()
    rg.add("w", model.w, [(14, 21)], Collect(model.w.shape))
    rg.add("w2", model.w2, [(7, 21)], Collect(model.w2.shape))
    with rg:
        _step(rg, model, x, src)
    got = [x.grad, src.grad] + ([model.b.grad] if bias else [])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol(torch.float32))


def test_blocks_arrive_when_nothing_upstream_requires_grad():
    """First layer of a network: neither the input nor the (frozen) weight needs a gradient, yet the rows do."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(5)
    model = Packed()
    x, src = _inputs(g, x_grad=False)
    src.requires_grad_(False)
    gw64, _ = _float64_grads(model, x, src)
    c = Collect(model.w.shape)
    rg = RowGrads()
    rg.add("w", model.w, [(0, 21)], c)
    rg.add("w2", model.w2, [(7, 21)], Collect(model.w2.shape))
    with rg:
        _step(rg, model, x, src)
    torch.testing.assert_close(c.full, gw64.float(), **MM_FP32)


def test_activation_checkpointing_gives_the_same_blocks():
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(6)
    torch.manual_seed(7)
    model = Packed()
    x, src = _inputs(g)
    results = []
    for ckpt in (False, True):
        c = Collect(model.w.shape)
        c2 = Collect(model.w2.shape)
        rg = RowGrads()
        rg.add("w", model.w, [(14, 21)], c)
        rg.add("w2", model.w2, [(7, 21)], c2)
        with rg:
            if ckpt:
                _step(rg, checkpoint, model, x, src, use_reentrant=False, context_fn=rg.checkpoint_contexts)
            else:
                _step(rg, model, x, src)
        results.append((c.full, c2.full, x.grad.clone()))
        x.grad = src.grad = None
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_autocast_bf16_blocks():
    """Under bf16 autocast the blocks match what autograd computes for the same rows under the same autocast."""
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(9)
    model = Packed(d=16)
    x, src = _inputs(g, d=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, src).backward()
    want, want_x = model.w.grad[32:48].clone(), x.grad.clone()
    model.w.grad = model.w2.grad = model.mix.grad = x.grad = src.grad = None
    c = Collect(model.w.shape)
    rg = RowGrads()
    rg.add("w", model.w, [(32, 48)], c)
    rg.add("w2", model.w2, [(16, 48)], Collect(model.w2.shape))
    with rg, torch.autocast("cpu", dtype=torch.bfloat16):
        _step(rg, model, x, src)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(c.full[32:48], want, **tol(torch.bfloat16))
    torch.testing.assert_close(x.grad, want_x, **tol(torch.bfloat16))


def test_requires_grad_restored_and_generation_counts():
    model = Packed()
    model.w.requires_grad_(True)
    model.w2.requires_grad_(False)
    rg = RowGrads()
    rg.add("w", model.w, [(0, 3)], Collect(model.w.shape))
    rg.add("w2", model.w2, [(0, 3)], Collect(model.w2.shape))
    with rg:
        assert not model.w.requires_grad
        x, src = _inputs(torch.Generator().manual_seed(0))
        for _ in range(2):
            _step(rg, model, x, src)
    assert model.w.requires_grad and not model.w2.requires_grad
    assert rg.generation == 2


def _one_target(fn, rows=((0, 3),)):
    model = Packed()
    rg = RowGrads()
    rg.add("packed.w", model.w, list(rows), Collect(model.w.shape))
    with rg, rg.forward():
        fn(model)


def test_errors_name_the_tensor_and_the_fix():
    x = torch.randn(2, 7)
    with pytest.raises(RowGradError, match=r"'packed.w' is used by .*row_grads=False"):
        _one_target(lambda m: F.linear(x, m.w).sum() + m.w.sum())
    with pytest.raises(RowGradError, match=r"not reached through F.linear.*'packed.w'"):
        _one_target(lambda m: F.linear(x, m.w2))
    with pytest.raises(RowGradError, match=r"used twice in one forward"):
        _one_target(lambda m: F.linear(x, m.w) + F.linear(x, m.w))
    with pytest.raises(RowGradError, match=r"not a slice of whole rows"):
        _one_target(lambda m: F.linear(torch.randn(2, 3), m.w[:, :3]))
    with pytest.raises(ValueError, match=r"rows \[0, 99\) of 'packed.w' are outside its 21 rows"):
        _one_target(lambda m: None, rows=((0, 99),))
    rg = RowGrads()
    with pytest.raises(ValueError, match="contiguous 2-D"):
        rg.add("v", torch.zeros(4), [(0, 1)], Collect((4,)))


# ---- the sinks ---------------------------------------------------------------------------------------------------


def _mse(model, x, y):
    return F.mse_loss(model(x), y)


class Net(torch.nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(d, 3 * d, bias=False)
        self.ff = torch.nn.Linear(3 * d, 2)

    def forward(self, x):
        return self.ff(torch.tanh(self.attn(x)))


@pytest.mark.parametrize("mode", ["grad_sq", "grad_abs", "taylor", "sgd_delta"])
def test_sensitivity_row_sink_equals_hooks(mode):
    torch.manual_seed(0)
    model = Net()
    batches = [(torch.randn(5, 4, 6), torch.randn(5, 4, 2)) for _ in range(3)]
    scores = []
    for use_rows in (False, True):
        with SensitivityAccumulator(model, ["attn.weight[2d:3d]"], mode=mode) as acc:
            rg = RowGrads()
            if use_rows:
                rg.add("attn.weight", model.attn.weight, [(12, 18)], acc.row_sink("attn.weight"))
            with rg:
                for x, y in batches:
                    _step(rg, _mse, model, x, y)
            scores.append(acc.scores["attn.weight"].clone())
            assert acc.steps == 3
    torch.testing.assert_close(scores[1], scores[0], **MM_FP32)


def test_sparse_adamw_row_sink_equals_hooks():
    torch.manual_seed(1)
    base = Net()
    idx = torch.sort(torch.randperm(18 * 6)[:20]).values.to(torch.int32)  # pivots anywhere in the packed weight
    pivots = PivotSet(["attn.weight"], [base.attn.weight.shape], [0, 20], idx)
    batches = [(torch.randn(5, 4, 6), torch.randn(5, 4, 2)) for _ in range(5)]
    finals = []
    for use_rows in (False, True):
        model = Net()
        model.load_state_dict(base.state_dict())
        for p in model.parameters():
            p.requires_grad_(False)
        model.attn.weight.requires_grad_(True)
        opt = SparseAdamW(model, pivots, lr=1e-2, gather_in_backward=True)
        rg = RowGrads()
        if use_rows:
            lo, hi = int(idx[0]) // 6, int(idx[-1]) // 6 + 1
            rg.add("attn.weight", model.attn.weight, [(lo, hi)], opt.row_sink(model.attn.weight))
        with rg:
            for x, y in batches:
                _step(rg, _mse, model, x, y)
                opt.clip_grad_norm_(1.0)
                opt.step()
                opt.zero_grad()
        finals.append(model.attn.weight.detach().clone())
    torch.testing.assert_close(finals[1], finals[0], **tol(torch.float32))
    off = torch.ones(18 * 6, dtype=torch.bool)
    off[idx.long()] = False
    assert torch.equal(finals[1].reshape(-1)[off], base.attn.weight.detach().reshape(-1)[off])
    with pytest.raises(ValueError, match="no pivots"):
        opt.row_sink(model.ff.weight)


# ---- tune() ------------------------------------------------------------------------------------------------------


def _ref():
    t = torch.arange(16000 * 4) / 16000
    return (0.3 * torch.sin(2 * torch.pi * 330 * t) * (1 + 0.5 * torch.sin(2 * torch.pi * 2 * t))).view(1, -1), 16000


@pytest.mark.parametrize(
    "preset,ckpt,prior",
    [(p, c, 0.0) for p in ("ppt", "dreamstyler") for c in (False, True)] + [("ppt", True, 1.0)],
)
def test_tune_with_and_without_row_grads(preset, ckpt, prior):
    """Row-scoped gradients give the whole-gradient result; with prior preservation two backward passes per step
    accumulate into the same row sinks."""
    pytest.importorskip("audiocraft")
    tune_mod = importlib.import_module("ppt_fast.tuning")
    runs = [
        tune_mod.tune_model(
            _ref(),
            model="tiny-random",
            steps=4,
            preset=preset,
            verbose=False,
            row_grads=rg,
            sensitivity_batches=2,
            use_cache=False,
            activation_checkpointing=ckpt,
            prior=prior,
            prior_clips=2,
        )  # fmt: skip
        for rg in (False, True)
    ]
    a, b = runs
    from ppt_fast.hosts.audiocraft import AudiocraftHost

    assert len(AudiocraftHost(b.model, "tiny-random").row_grad_weights()) == 4  # self + cross attention of both layers
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a.pivots["<v1>"], b.pivots["<v1>"]))
    assert a.losses == pytest.approx(b.losses, rel=1e-6, abs=1e-6)
    pa, pb = dict(a.model.lm.named_parameters()), dict(b.model.lm.named_parameters())
    for n in pa:
        torch.testing.assert_close(pb[n], pa[n], **tol(torch.float32))
    torch.testing.assert_close(b.tokens["<v1>"], a.tokens["<v1>"], **tol(torch.float32))
    assert all(not p.requires_grad for p in b.model.lm.parameters())


def test_auto_turns_row_grads_on_only_for_large_projections():
    pytest.importorskip("audiocraft")
    tune_mod = importlib.import_module("ppt_fast.tuning")
    from ppt_fast.models import load_host

    lm = load_host("tiny-random")
    names = list(lm.row_grad_weights())
    targets = [(n, [(0, 1)], lambda *a: None) for n in names]
    assert len(tune_mod._row_grads(lm, targets, True)) == 4
    assert len(tune_mod._row_grads(lm, targets, None)) == 0  # 4 x [192, 64]: far below ROW_GRADS_AUTO_MIN
    old = tune_mod.ROW_GRADS_AUTO_MIN
    try:
        tune_mod.ROW_GRADS_AUTO_MIN = 1
        assert len(tune_mod._row_grads(lm, targets, None)) == 4
    finally:
        tune_mod.ROW_GRADS_AUTO_MIN = old
