"""sparse_adamw_step on every backend: several steps against AdamW in fp64 and torch.optim.AdamW on the pivots."""

from __future__ import annotations

import math

import pytest
import torch
from _op_cases import AWKWARD_SHAPES, REALISTIC_SHAPES, backend_params, randn, strided_view, use_backend
from tolerances import ADAMW_FP32

from ppt_fast import PivotError
from ppt_fast.ops import sparse_adamw_step

OP = "sparse_adamw_step"
BACKENDS = backend_params(OP)
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
ADAMW_TOL = {"rtol": ADAMW_FP32[0], "atol": ADAMW_FP32[1]}
# exp_avg_sq is a sum of positive terms ~(1 - beta2)·g², far below ADAMW_FP32's atol: compare it relatively only.
V_TOL = {"rtol": ADAMW_FP32[0], "atol": 0.0}


def _sample(n: int, c: int) -> torch.Tensor:
    """c distinct random indices in [0, n), sorted (randperm(n) would cost O(n) int64 for a 1 % sample)."""
    if c * 20 >= n:
        return torch.sort(torch.randperm(n)[:c]).values
    while True:
        u = torch.unique(torch.randint(0, n, (2 * c,)))
        if u.numel() >= c:
            return torch.sort(u[torch.randperm(u.numel())[:c]]).values


class Case:
    """Parameters, pivots and optimizer state for one multi-step run, plus an fp64 model of what AdamW does."""

    def __init__(self, shapes, dtypes, device, density=0.01, master=None, empty=(), pivot_grads=False):
        self.device = device
        self.params = [randn(s, dt, device) for s, dt in zip(shapes, dtypes)]
        self.before = [p.clone() for p in self.params]
        idx, offsets = [], [0]
        for i, p in enumerate(self.params):
            n = p.numel()
            c = 0 if i in empty else min(n, max(1, round(density * n)))
            idx.append(_sample(n, c).to(torch.int32))
            offsets.append(offsets[-1] + c)
        self.local = idx
        self.offsets = offsets
        self.indices = torch.cat(idx).to(device)
        k = offsets[-1]
        self.exp_avg = torch.zeros(k, device=device)
        self.exp_avg_sq = torch.zeros(k, device=device)
        if master is None:
            master = any(dt != torch.float32 for dt in dtypes)
        self.master = self.gather(self.params).float() if master else None
        self.pivot_grads = pivot_grads
        self.theta = self.gather(self.params).cpu().double()
        self.m = torch.zeros(k, dtype=torch.float64)
        self.v = torch.zeros(k, dtype=torch.float64)
        self.step_count = 0

    def gather(self, tensors) -> torch.Tensor:
        parts = [t.reshape(-1)[i.to(t.device).long()].float() for t, i in zip(tensors, self.local)]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def step(self, grads, grad_scale=None, found_inf=None, **hyper) -> None:
        """One step of the op, and of the fp64 model (skipped like the op when found_inf is non-zero)."""
        hyper = {**HYPER, **hyper}
        self.step_count += 1
        kwargs = dict(grad_scale=grad_scale, found_inf=found_inf, step=self.step_count, **hyper)
        if self.pivot_grads:
            g_piv = self.gather(grads).to(grads[0].dtype) if grads else None
            sparse_adamw_step(
                self.params, None, self.offsets, self.indices, self.exp_avg, self.exp_avg_sq, self.master,
                pivot_grads=g_piv, **kwargs,
            )  # fmt: skip
        else:
            sparse_adamw_step(
                self.params, grads, self.offsets, self.indices, self.exp_avg, self.exp_avg_sq, self.master, **kwargs
            )
        if found_inf is not None and float(found_inf) != 0:
            self.step_count -= 1
            return
        g = self.gather(grads).cpu().double()
        if grad_scale is not None:
            g = g / float(grad_scale)
        lr, b1, b2, eps, wd = (hyper[n] for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
        t = self.step_count
        self.theta = self.theta * (1 - lr * wd)
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        denom = self.v.sqrt() / math.sqrt(1 - b2**t) + eps
        self.theta = self.theta - lr / (1 - b1**t) * self.m / denom

    def check(self) -> None:
        """Pivots match the fp64 model; every other entry is bitwise what it was."""
        torch.testing.assert_close(self.exp_avg.cpu().double(), self.m, **ADAMW_TOL)
        torch.testing.assert_close(self.exp_avg_sq.cpu().double(), self.v, **V_TOL)
        got = self.gather(self.params).cpu()
        if self.master is not None:
            torch.testing.assert_close(self.master.cpu().double(), self.theta, **ADAMW_TOL)
            # the parameter holds master rounded once into its dtype
            for p, m in zip(self.params, self.master.cpu().split(self.counts())):
                assert torch.equal(self.gather_one(p).cpu(), m.to(p.dtype))
        else:
            torch.testing.assert_close(got.double(), self.theta, **ADAMW_TOL)
        for p, b, i in zip(self.params, self.before, self.local):
            keep = torch.ones(p.numel(), dtype=torch.bool)
            keep[i.long()] = False
            assert torch.equal(p.reshape(-1).cpu()[keep], b.reshape(-1).cpu()[keep]), "a non-pivot entry changed"

    def counts(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets, self.offsets[1:])]

    def gather_one(self, p) -> torch.Tensor:
        i = next(j for j, q in enumerate(self.params) if q is p)
        return p.reshape(-1)[self.local[i].to(p.device).long()]


def _grads(case: Case, dtype=None) -> list[torch.Tensor]:
    return [randn(p.shape, dtype or p.dtype, case.device) for p in case.params]


PARAM_SETUPS = {
    "fp32": ([torch.float32], False),
    "fp32-master": ([torch.float32], True),
    "bf16-master": ([torch.bfloat16], True),
    "fp16-master": ([torch.float16], True),
    "mixed-master": ([torch.float32, torch.bfloat16, torch.float16], True),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("setup", list(PARAM_SETUPS))
@pytest.mark.parametrize("pivot_grads", [False, True], ids=["dense", "pivot_grads"])
def test_steps_awkward_shapes(backend, device, setup, pivot_grads):
    """6 steps over awkward shapes (a tensor with zero pivots among them) at 5 % density."""
    dtypes, master = PARAM_SETUPS[setup]
    shapes = AWKWARD_SHAPES + [(40, 3)]
    dtypes = [dtypes[i % len(dtypes)] for i in range(len(shapes))]
    with use_backend(OP, backend, device) as dev:
        case = Case(shapes, dtypes, dev, density=0.05, master=master, empty=(2,), pivot_grads=pivot_grads)
        for _ in range(6):
            case.step(_grads(case))
    case.check()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_steps_realistic_shapes_vs_torch_adamw(backend, device):
    """5 steps at 1 % density over MusicGen-small weight shapes, against fp64 math and against torch.optim.AdamW
    run on a Parameter holding just the pivot entries (fp32 vs fp32: same formula, same order of operations)."""
    with use_backend(OP, backend, device) as dev:
        case = Case(REALISTIC_SHAPES, [torch.float32] * 3, dev, density=0.01)
        ref_param = torch.nn.Parameter(case.gather(case.params).clone())
        betas = (HYPER["beta1"], HYPER["beta2"])
        opt = torch.optim.AdamW(
            [ref_param],
            lr=HYPER["lr"],
            betas=betas,
            eps=HYPER["eps"],
            weight_decay=HYPER["weight_decay"],
            foreach=False,
        )
        for _ in range(5):
            grads = _grads(case)
            case.step(grads)
            ref_param.grad = case.gather(grads)
            opt.step()
    case.check()
    state = opt.state[ref_param]
    torch.testing.assert_close(case.gather(case.params), ref_param.detach(), **ADAMW_TOL)
    torch.testing.assert_close(case.exp_avg, state["exp_avg"], **ADAMW_TOL)
    torch.testing.assert_close(case.exp_avg_sq, state["exp_avg_sq"], **V_TOL)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_scale_and_found_inf(backend, device):
    """GradScaler protocol: grads come scaled and are divided by grad_scale; found_inf != 0 skips the step and
    leaves params, moments and master bitwise as they were."""
    with use_backend(OP, backend, device) as dev:
        case = Case([(257, 33), (1000,)], [torch.bfloat16, torch.float32], dev, density=0.1)
        scale = torch.tensor([4096.0], device=dev)
        for step in range(7):
            grads = _grads(case, torch.float32)
            if step in (2, 5):
                saved = [t.clone() for t in (*case.params, case.exp_avg, case.exp_avg_sq, case.master)]
                grads[0].view(-1)[0] = float("inf")
                case.step(grads, grad_scale=scale, found_inf=torch.tensor([1.0], device=dev))
                after = (*case.params, case.exp_avg, case.exp_avg_sq, case.master)
                assert all(torch.equal(a, b) for a, b in zip(after, saved)), "found_inf must skip the step"
                continue
            case.step([g * scale for g in grads], grad_scale=scale, found_inf=torch.tensor([0.0], device=dev))
    case.check()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_grads_and_hyperparameters(backend, device):
    """Strided dense grads are read correctly; beta1 >= 0.5 uses torch's other lerp form; no weight decay."""
    with use_backend(OP, backend, device) as dev:
        case = Case([(64, 40), (7,)], [torch.float32] * 2, dev, density=0.2)
        for _ in range(5):
            grads = [strided_view(p.shape, torch.float16, dev) for p in case.params]
            case.step(grads, beta1=0.3, beta2=0.99, weight_decay=0.0, lr=3e-3, eps=1e-6)
    case.check()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_pivots_and_empty_lists(backend, device):
    with use_backend(OP, backend, device) as dev:
        case = Case([(5,), (3, 3)], [torch.bfloat16, torch.float32], dev, empty=(0, 1))
        case.step(_grads(case))  # k == 0: nothing to do (master may be None for bf16 without pivots)
        case.check()
        empty = torch.zeros(0, device=dev)
        sparse_adamw_step(
            [], [], [0], torch.zeros(0, dtype=torch.int32, device=dev), empty, empty, step=1, lr=1e-3
        )  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    with use_backend(OP, backend, device) as dev:
        case = Case([(33, 5), (80,)], [torch.bfloat16, torch.float32], dev, density=0.2)
        grads = _grads(case)
        scale, inf = torch.tensor([2.0], device=dev), torch.tensor([0.0], device=dev)
        args = (case.params, grads, case.offsets, case.indices, case.exp_avg, case.exp_avg_sq, case.master, None)
        hyper = tuple(HYPER[n] for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
        torch.library.opcheck(torch.ops.ppt_fast.sparse_adamw_step.default, (*args, scale, inf, None, None, *hyper, 1))
        coef, flag = torch.tensor([0.5], device=dev), torch.zeros(1, device=dev)
        torch.library.opcheck(torch.ops.ppt_fast.sparse_adamw_step.default, (*args, None, None, coef, flag, *hyper, 2))
        piv = case.gather(grads)
        args = (case.params, [], case.offsets, case.indices, case.exp_avg, case.exp_avg_sq, case.master, piv)
        torch.library.opcheck(torch.ops.ppt_fast.sparse_adamw_step.default, (*args, None, None, None, None, *hyper, 3))


def test_bad_inputs_raise_clear_errors():
    case = Case([(10,), (4, 4)], [torch.float32, torch.float32], torch.device("cpu"), density=0.3)
    p, off, idx, m, v = case.params, case.offsets, case.indices, case.exp_avg, case.exp_avg_sq
    g = _grads(case)

    def call(**kw):
        args = {"params": p, "grads": g, "offsets": off, "indices": idx, "exp_avg": m, "exp_avg_sq": v}
        args.update(kw)
        hyper = {"step": 1, "lr": 1e-3}
        hyper.update(args.pop("hyper", {}))
        sparse_adamw_step(**args, **hyper)

    with pytest.raises(ValueError, match="offsets has 2 entries"):
        call(offsets=off[:2])
    with pytest.raises(ValueError, match="never decrease"):
        call(offsets=[0, 5, 3])
    with pytest.raises(ValueError, match="indices must be int32"):
        call(indices=idx.long())
    with pytest.raises(ValueError, match="exactly one of grads"):
        call(pivot_grads=case.gather(g))
    with pytest.raises(ValueError, match="exactly one of grads"):
        call(grads=None)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        call(hyper={"step": 0})
    with pytest.raises(ValueError, match="beta2=1.0 must lie in"):
        call(hyper={"beta2": 1.0})
    with pytest.raises(ValueError, match="lr=-0.1"):
        call(hyper={"lr": -0.1})
    with pytest.raises(ValueError, match="exp_avg_sq must be a contiguous float32"):
        call(exp_avg_sq=v[:-1])
    with pytest.raises(ValueError, match="exp_avg must be a contiguous float32"):
        call(exp_avg=m.double())
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(16,\)"):
        call(grads=[g[0], g[1].reshape(-1)])
    with pytest.raises(ValueError, match=r"params \[1\] are torch.bfloat16 and need an fp32 master"):
        call(params=[p[0], p[1].bfloat16()])
    with pytest.raises(PivotError, match=r"tensor 'params\[1\]' is outside \[0, 2\)"):
        call(params=[p[0], torch.zeros(2)], grads=[g[0], torch.zeros(2)])
    with pytest.raises(ValueError, match=r"params\[0\] is not contiguous"):
        call(params=[torch.zeros(20)[::2], p[1]])
    with pytest.raises(ValueError, match="one-element float32"):
        call(grad_scale=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="indices are on meta"):
        call(indices=idx.to("meta"))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpp"])
@pytest.mark.parametrize("checked", [False, True])
def test_cpp_kernel_never_writes_outside_a_parameter(backend, device, checked):
    """The raw private kernel (no Python checks), handed an index past the end of params[1] whose storage continues
    into a neighbour: the pass skips that pivot, so the neighbour stays bitwise unchanged while the valid pivots
    update (checked or not)."""
    storage = torch.randn(10 + 16 + 8)
    params = [storage[:10], storage[10:26].view(4, 4)]
    neighbour = storage[26:].clone()
    case = Case([(10,), (4, 4)], [torch.float32, torch.float32], torch.device("cpu"), density=0.3)
    bad = case.indices.clone()
    bad[-1] = 16 + 3  # lands in the neighbour, three entries past the end of params[1]
    saved = storage.clone()
    flag = torch.zeros(1) if checked else None
    torch.ops.ppt_fast._sparse_adamw_step_cpp(
        params, _grads(case), case.offsets, bad, case.exp_avg, case.exp_avg_sq, None, None, None, None, None, flag,
        1e-3, 0.9, 0.999, 1e-8, 0.0, 1,
    )  # fmt: skip
    assert torch.equal(storage[26:], neighbour)
    assert not torch.equal(storage[:26], saved[:26])  # the valid pivots did update


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("where", ["first", "last", "inf"])
@pytest.mark.parametrize("density", [0.3, 0.01])  # cpp: check-first above 2.5 %, speculative + rollback below
@pytest.mark.parametrize("master", [True, False])
def test_checked_step_with_a_nonfinite_gradient_changes_nothing(backend, device, where, density, master):
    """A NaN/inf at one pivot (first or last tensor, a grad scale and a clipping coefficient in play; bf16 params
    with an fp32 master beside fp32 ones, or fp32 alone): the checked step raises its flag and every param, m, v and
    master is bitwise what it was, after two good checked steps that matched the unchecked op exactly."""
    with use_backend(OP, backend, device) as dev:
        shapes = [(330, 50), (8000,), (700,)]
        dtypes = [torch.bfloat16 if master else torch.float32, torch.float32, torch.float32]
        case = Case(shapes, dtypes, dev, density=density)
        twin = [p.clone() for p in case.params]
        twin_state = [t.clone() if t is not None else None for t in (case.exp_avg, case.exp_avg_sq, case.master)]
        grads = _grads(case)
        scale, coef = torch.tensor([2.0], device=dev), torch.tensor([0.5], device=dev)
        for step in (1, 2):  # finite steps first, so m, v and master hold non-trivial values
            flag = torch.zeros(1, device=dev)
            sparse_adamw_step(case.params, grads, case.offsets, case.indices, case.exp_avg, case.exp_avg_sq,
                              case.master, step=step, lr=1e-2, grad_scale=scale, grad_coef=coef, nonfinite=flag)
            sparse_adamw_step(twin, grads, case.offsets, case.indices, *twin_state, step=step, lr=1e-2,
                              grad_scale=scale, grad_coef=coef)  # fmt: skip
            assert float(flag) == 0.0
        assert all(torch.equal(a, b) for a, b in zip(case.params, twin))  # checked == unchecked, bitwise
        before = [t.clone() for t in case.params + [case.exp_avg, case.exp_avg_sq]]
        before += [case.master.clone()] if case.master is not None else []
        t = 0 if where == "first" else 2
        grads[t].view(-1)[case.indices[case.offsets[t]].long()] = float("inf") if where == "inf" else float("nan")
        flag = torch.zeros(1, device=dev)
        sparse_adamw_step(case.params, grads, case.offsets, case.indices, case.exp_avg, case.exp_avg_sq, case.master,
                          step=3, lr=1e-2, grad_scale=scale, grad_coef=coef, nonfinite=flag)  # fmt: skip
        assert float(flag) == 1.0
        after = case.params + [case.exp_avg, case.exp_avg_sq] + ([case.master] if case.master is not None else [])
        assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad_index", ["numel", "minus_one", "int32_max", "unsorted", "duplicate"])
def test_every_backend_refuses_invalid_raw_indices(backend, device, bad_index):
    """The functional op with hand-made indices (no PivotSet): every backend refuses them with PivotError before any
    kernel runs, and nothing is written."""
    with use_backend(OP, backend, device) as dev:
        case = Case([(10,), (4, 4)], [torch.float32, torch.float32], dev, density=0.4)
        bad = case.indices.clone()
        lo = case.offsets[1]
        bad[-1] = {"numel": 16, "minus_one": -1, "int32_max": 2**31 - 1}.get(bad_index, bad[-1])
        if bad_index == "unsorted":
            bad[lo], bad[lo + 1] = case.indices[lo + 1], case.indices[lo]
        if bad_index == "duplicate":
            bad[lo + 1] = bad[lo]
        saved = [t.clone() for t in case.params]
        with pytest.raises(PivotError, match=r"params\[1\]"):
            sparse_adamw_step(
                case.params, _grads(case), case.offsets, bad, case.exp_avg, case.exp_avg_sq, step=1, lr=1e-3
            )
        assert all(torch.equal(a, b) for a, b in zip(case.params, saved))
        # the mark of a check is dropped by an in-place change: corrupting checked indices is caught too
        good = case.indices.clone()
        sparse_adamw_step(case.params, _grads(case), case.offsets, good, case.exp_avg, case.exp_avg_sq, step=1, lr=1e-3)
        good[-1] = 16
        with pytest.raises(PivotError):
            sparse_adamw_step(
                case.params, _grads(case), case.offsets, good, case.exp_avg, case.exp_avg_sq, step=2, lr=1e-3
            )
