"""SensitivityAccumulator: scores vs autograd in float64, freed gradients, requires_grad handling, pivots()."""

from __future__ import annotations

import pytest
import torch
from tolerances import tol

import ppt_fast
from ppt_fast.pivots import PivotSet
from ppt_fast.sensitivity import SensitivityAccumulator


class Net(torch.nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(d, 3 * d, bias=False)  # a packed [3d, d] weight
        self.ff = torch.nn.Linear(3 * d, 11)
        self.head = torch.nn.Linear(11, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.ff(torch.tanh(self.attn(x)))))


SCOPE = ["attn.weight[2d:3d]", "ff.weight[1:10]", "head.bias"]
ROWS = {"attn.weight": (12, 18), "ff.weight": (1, 10), "head.bias": (0, 2)}


def grads64(model, x, y) -> dict[str, torch.Tensor]:
    m64 = Net()
    m64.load_state_dict(model.state_dict())
    m64.double()
    loss = torch.nn.functional.mse_loss(m64(x.double()), y.double())
    names = list(ROWS)
    params = dict(m64.named_parameters())
    gs = torch.autograd.grad(loss, [params[n] for n in names])
    return dict(zip(names, gs))


def f(mode: str, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return {"grad_sq": g * g, "grad_abs": g.abs(), "taylor": (g * p).abs(), "sgd_delta": g}[mode]


@pytest.mark.parametrize("mode", ["grad_sq", "grad_abs", "taylor", "sgd_delta"])
def test_scores_match_float64_autograd(mode):
    model = Net()
    batches = [(torch.randn(9, 6), torch.randn(9, 2)) for _ in range(3)]
    want = {n: torch.zeros(1, dtype=torch.float64) for n in ROWS}
    params = dict(model.named_parameters())
    for x, y in batches:
        for n, g in grads64(model, x, y).items():
            lo, hi = ROWS[n]
            want[n] = want[n] + f(mode, g[lo:hi], params[n].detach().double()[lo:hi])
    with SensitivityAccumulator(model, SCOPE, mode=mode) as acc:
        for x, y in batches:
            torch.nn.functional.mse_loss(model(x), y).backward()
        assert acc.steps == 3
        for n in ROWS:
            assert acc.scores[n].shape == want[n].shape
            # fp32 forward/backward vs fp64: errors ~1e-7 of the tensor's largest gradient, and sgd_delta's signed sums
            # can cancel, so atol scales with the largest score; a wrong mode or a wrong row slice is off by O(1).
            scale = float(want[n].abs().max())
            torch.testing.assert_close(acc.scores[n].double(), want[n], rtol=1e-5, atol=1e-5 * scale)


def test_grads_are_freed_and_requires_grad_restored():
    model = Net()
    model.ff.weight.requires_grad_(False)  # a frozen in-scope tensor is turned on while scoring
    alive_at_hook = []

    def spy(p):
        alive_at_hook.append(sum(q.grad is not None for q in model.parameters()))

    with SensitivityAccumulator(model, SCOPE) as acc:
        spies = [p.register_post_accumulate_grad_hook(spy) for p in model.parameters() if p.requires_grad]
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        assert flags == {
            "attn.weight": True,
            "ff.weight": True,
            "ff.bias": False,
            "head.weight": False,
            "head.bias": True,
        }
        torch.nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 2)).backward()
        assert all(p.grad is None for p in model.parameters())
        assert max(alive_at_hook) <= 1  # never more than the one gradient being scored
        assert acc.steps == 1
        for h in spies:
            h.remove()
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, True]
    torch.nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 2)).backward()
    assert model.attn.weight.grad is not None  # hooks are gone
    assert acc.steps == 1
    acc.remove()  # idempotent


def test_pivots_are_global_topk_in_whole_tensor_indices():
    model = Net()
    acc = SensitivityAccumulator(model, SCOPE)
    for _ in range(2):
        torch.nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 2)).backward()
    acc.remove()
    k = 17
    ps = acc.pivots(count=k)
    assert isinstance(ps, PivotSet) and ps.count == k
    assert ps.names == list(ROWS) and ps.shapes == [model.attn.weight.shape, model.ff.weight.shape, (2,)]
    # oracle: torch.topk over the concatenated scores, mapped back to whole-parameter flat indices
    flat = torch.cat([acc.scores[n].reshape(-1) for n in ROWS])
    top = set(torch.topk(flat, k).indices.tolist())
    want, base = {}, 0
    params = dict(model.named_parameters())
    for n, (lo, _) in ROWS.items():
        row = params[n][0].numel() if params[n].dim() > 1 else 1
        size = acc.scores[n].numel()
        want[n] = sorted(i - base + lo * row for i in top if base <= i < base + size)
        base += size
    assert {n: idx.tolist() for n, idx in ps} == want
    for n, idx in ps:  # every pivot lies inside the in-scope rows
        lo, hi = ROWS[n]
        row = params[n][0].numel() if params[n].dim() > 1 else 1
        assert all(lo * row <= i < hi * row for i in idx.tolist())
    # ratio is relative to the in-scope entries
    n_scope = sum(s.numel() for s in acc.scores.values())
    assert acc.numel == n_scope and acc.pivots(ratio=0.1).count == round(0.1 * n_scope)
    per = acc.pivots(ratio=0.5, per_tensor=True)
    assert per.counts() == [round(0.5 * acc.scores[n].numel()) for n in ROWS]


def test_pivots_feed_sparse_adamw_and_only_scope_moves():
    model = Net()
    with SensitivityAccumulator(model, "attn.weight[2d:3d]") as acc:
        torch.nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 2)).backward()
        ps = acc.pivots(ratio=0.25)
    before = model.attn.weight.detach().clone()
    with ppt_fast.freeze_unpivoted(model, ps):
        opt = ppt_fast.SparseAdamW(model, ps, lr=0.1)
        torch.nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 2)).backward()
        opt.step()
    changed = (model.attn.weight != before).reshape(-1).nonzero().reshape(-1)
    assert set(changed.tolist()) <= set(ps.indices_of("attn.weight").tolist())
    assert changed.numel() > 0 and bool((changed >= 12 * 6).all())


def test_bf16_scores():
    model = Net()
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    with SensitivityAccumulator(model, SCOPE, score_dtype=torch.bfloat16) as a16:
        torch.nn.functional.mse_loss(model(x), y).backward()
    with SensitivityAccumulator(model, SCOPE) as a32:
        torch.nn.functional.mse_loss(model(x), y).backward()
    for n in ROWS:
        assert a16.scores[n].dtype == torch.bfloat16
        torch.testing.assert_close(a16.scores[n].float(), a32.scores[n], **tol(torch.bfloat16))


def test_errors():
    model = Net()
    with pytest.raises(ValueError, match="selects no parameter"):
        SensitivityAccumulator(model, ["nothing.*"])
    with pytest.raises(ValueError, match="mode"):
        SensitivityAccumulator(model, SCOPE, mode="fisher")
    with pytest.raises(ValueError, match="score_dtype"):
        SensitivityAccumulator(model, SCOPE, score_dtype=torch.float16)
    with SensitivityAccumulator(model, SCOPE) as acc:
        with pytest.raises(RuntimeError, match="backward"):
            acc.pivots(ratio=0.1)
        torch.nn.functional.mse_loss(model(torch.randn(2, 6)), torch.randn(2, 2)).backward()
        with pytest.raises(ValueError, match="ratio"):
            acc.pivots(ratio=1.5)
        acc.reset()
        assert acc.steps == 0 and all(float(s.abs().sum()) == 0 for s in acc.scores.values())


def test_public_name():
    assert ppt_fast.SensitivityAccumulator is SensitivityAccumulator


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["grad_sq", "taylor"])
def test_cuda_matches_cpu(mode):
    """The selected GPU backends (accumulate + select) against the CPU run on identical gradients."""
    model = Net()
    gpu = Net().cuda()
    gpu.load_state_dict(model.state_dict())
    accs = []
    for m in (model, gpu):
        acc = SensitivityAccumulator(m, SCOPE, mode=mode)
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            grads = {n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}
            sum((p * grads[n].to(p.device)).sum() for n, p in m.named_parameters() if p.requires_grad).backward()
        acc.remove()
        accs.append(acc)
    for n in ROWS:
        torch.testing.assert_close(accs[1].scores[n].cpu(), accs[0].scores[n], **tol(torch.float32))
    assert accs[1].pivots(count=20).to("cpu").equal(accs[0].pivots(count=20))


@pytest.mark.parametrize("mode", ["grad_sq", "taylor"])
def test_without_hooks_scores_the_gradients_held_now(mode):
    """hooks=False: nothing is installed, requires_grad is untouched, `accumulate_grads()` scores `p.grad` where the
    caller has it (here: after scaling, as a solver's clipping would) and leaves it in place."""
    torch.manual_seed(3)
    model = Net()
    model.head.weight.requires_grad_(False)
    acc = SensitivityAccumulator(model, SCOPE, mode=mode, hooks=False)
    assert not model.head.weight.requires_grad and model.ff.bias.requires_grad
    want = {n: torch.zeros(r[1] - r[0], *p.shape[1:], dtype=torch.float64) for n, p in model.named_parameters()
            for m, r in ROWS.items() if m == n}  # fmt: skip
    for _ in range(3):
        x, y = torch.randn(5, 6), torch.randn(5, 2)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        params = dict(model.named_parameters())
        for n in ROWS:
            params[n].grad.mul_(0.5)  # what the caller did to the gradient before scoring it
        held = {n: params[n].grad.clone() for n in ROWS}
        assert acc.accumulate_grads() == len(ROWS)
        for n, (lo, hi) in ROWS.items():
            assert torch.equal(params[n].grad, held[n])  # left in place
            g, p = held[n].double()[lo:hi], params[n].detach().double()[lo:hi]
            want[n] += f(mode, g, p)
    assert acc.steps == 3
    for n in ROWS:
        torch.testing.assert_close(acc.scores[n].double(), want[n], **tol(torch.float32))
    model.head.bias.grad = None
    assert acc.accumulate_grads() == len(ROWS) - 1  # a tensor without a gradient is skipped


def test_state_dict_resumes_an_accumulation():
    torch.manual_seed(4)
    model = Net()
    batches = [(torch.randn(5, 6), torch.randn(5, 2)) for _ in range(4)]

    def run(acc, part):
        for x, y in part:
            torch.nn.functional.mse_loss(model(x), y).backward()

    with SensitivityAccumulator(model, SCOPE) as whole:
        run(whole, batches)
    with SensitivityAccumulator(model, SCOPE) as first:
        run(first, batches[:2])
        saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in first.state_dict().items()}
        saved["scores"] = {n: s.clone() for n, s in saved["scores"].items()}
    with SensitivityAccumulator(model, SCOPE) as second:
        second.load_state_dict(saved)
        run(second, batches[2:])
        assert second.steps == whole.steps == 4
        for n in ROWS:
            torch.testing.assert_close(second.scores[n], whole.scores[n], rtol=1e-6, atol=0)
        assert torch.equal(second.pivots(count=7).indices, whole.pivots(count=7).indices)
    with SensitivityAccumulator(model, SCOPE, mode="grad_abs") as other, pytest.raises(ValueError, match="another"):
        other.load_state_dict(saved)
