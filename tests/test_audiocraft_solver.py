"""PPT at audiocraft's optimizer seam, exercised with the solver's own pieces on the tiny model."""

import copy

import pytest
import torch

pytest.importorskip("audiocraft")

from omegaconf import OmegaConf  # noqa: E402
from tolerances import ADAMW_FP32  # noqa: E402

from ppt_fast.hosts.audiocraft import patches, solver  # noqa: E402
from ppt_fast.models import load_model  # noqa: E402

SENS = 2


def _cfg(name="ppt_sparse_adamw"):
    return OmegaConf.create(
        {
            "optimizer": name,
            "lr": 1e-3,
            "max_norm": 1.0,
            "adam": {"betas": [0.9, 0.95], "weight_decay": 0.1, "eps": 1e-8},
            "ppt": {"ratio": 0.05, "sensitivity_steps": SENS},
        }
    )


@pytest.fixture
def patched():
    patches.apply_ppt_to_audiocraft()
    yield
    patches.revert_ppt_to_audiocraft()


def _batch(lm, seed):
    from audiocraft.modules.conditioners import ConditioningAttributes

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (2, lm.n_q, 30), generator=g)
    attrs = [ConditioningAttributes(text={"description": t}) for t in ("warm piano", "fast drums")]
    return codes, attrs


def _run_step(lm, opt, seed, max_norm=1.0):
    """MusicGenSolver.run_step's training path: predictions, its CE, backward, clip, step."""
    from audiocraft.solvers.musicgen import MusicGenSolver

    codes, attrs = _batch(lm, seed)
    tokenized = lm.condition_provider.tokenize(attrs)
    out = lm.compute_predictions(codes, [], lm.condition_provider(tokenized))
    ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, torch.ones_like(codes).bool() & out.mask)
    ce.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), max_norm)
    grads = {p: p.grad.clone() for p in lm.parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad()
    return grads


def test_apply_revert_and_default_passthrough(patched):
    from audiocraft.solvers import builders

    assert patches.is_applied()
    lm = load_model("tiny-random").lm
    adamw = builders.get_optimizer(builders.get_optim_parameter_groups(lm), _cfg("adamw"))
    assert type(adamw) is torch.optim.AdamW
    patches.revert_ppt_to_audiocraft()
    assert builders.get_optimizer.__module__ == "audiocraft.solvers.builders"
    with pytest.raises(ValueError, match="Unsupported Optimizer"):
        builders.get_optimizer(builders.get_optim_parameter_groups(lm), _cfg())
    patches.apply_ppt_to_audiocraft()
    patches.apply_ppt_to_audiocraft()  # idempotent
    patches.revert_ppt_to_audiocraft()
    assert builders.get_optimizer.__module__ == "audiocraft.solvers.builders"


def test_solver_loop_sparse_adamw_matches_torch_adamw_on_pivots(patched):
    from audiocraft.solvers import builders

    lm = load_model("tiny-random").lm
    lm.train()
    for p in lm.parameters():
        p.requires_grad_(True)
    groups = builders.get_optim_parameter_groups(lm)
    assert len(groups) == 6 and all("name" not in g for g in groups)
    opt = builders.get_optimizer(groups, _cfg())
    assert isinstance(opt, solver.PptSolverAdamW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    base = {n: p.detach().clone() for n, p in lm.named_parameters()}
    names = {p: n for n, p in lm.named_parameters()}
    for s in range(SENS):  # sensitivity warm-up: nothing moves
        _run_step(lm, opt, seed=s)
        sched.step()
        assert all(torch.equal(p, base[n]) for n, p in lm.named_parameters())
    piv = opt.pivots()
    d = lm.dim
    scope_total = sum(d * d + 2 * d * d for n in base if n.endswith("self_attn.in_proj_weight"))
    assert sum(i.numel() for i in piv.values()) == round(0.05 * scope_total)
    for p, idx in piv.items():
        rows = idx.long() // p.shape[1]
        lo = 2 * d if "self_attn" in names[p] else d
        assert "in_proj_weight" in names[p] and rows.min() >= lo and rows.max() < 3 * d
    # Oracle: torch.optim.AdamW on the pivot entries only, fed the same (clipped) gradients and the group's lr.
    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    shadow = {p: p.detach().reshape(-1)[i.long()].clone().requires_grad_(True) for p, i in piv.items()}
    ref = {
        p: torch.optim.AdamW([x], lr=group_of[p]["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for p, x in shadow.items()
    }
    for s in range(SENS, SENS + 4):
        lrs = [g["lr"] for g in opt.param_groups]
        grads = _run_step(lm, opt, seed=s)
        for p, x in shadow.items():
            for group in ref[p].param_groups:
                group["lr"] = lrs[opt.param_groups.index(group_of[p])]
            x.grad = grads[p].reshape(-1)[piv[p].long()].clone()
            ref[p].step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** (s + 1))
    rtol, atol = ADAMW_FP32
    for p, x in shadow.items():
        torch.testing.assert_close(p.detach().reshape(-1)[piv[p].long()], x.detach(), rtol=rtol, atol=atol)
    # Everything else is bitwise untouched.
    for n, p in lm.named_parameters():
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        if p in piv:
            mask[piv[p].long()] = True
        assert torch.equal(p.detach().reshape(-1)[~mask], base[n].reshape(-1)[~mask]), n
    assert any(not torch.equal(p, base[names[p]]) for p in piv)


def test_state_dict_checkpoint_resumes_bitwise(patched):
    from audiocraft.solvers import builders

    lm_a = load_model("tiny-random").lm
    for p in lm_a.parameters():
        p.requires_grad_(True)
    opt_a = builders.get_optimizer(builders.get_optim_parameter_groups(lm_a), _cfg())
    for s in range(SENS + 2):
        _run_step(lm_a, opt_a, seed=s)
    ckpt = copy.deepcopy(opt_a.state_dict())
    lm_b = copy.deepcopy(lm_a)
    opt_b = builders.get_optimizer(builders.get_optim_parameter_groups(lm_b), _cfg())
    opt_b.load_state_dict(ckpt)
    sparse_state = opt_b.sparse.state_dict()["state"]
    assert all(st["exp_avg"].dtype == torch.float32 for st in sparse_state.values())
    assert all(st["indices"].dtype == torch.int32 for st in sparse_state.values())
    for s in range(SENS + 2, SENS + 5):
        _run_step(lm_a, opt_a, seed=s)
        _run_step(lm_b, opt_b, seed=s)
    for (n, pa), pb in zip(lm_a.named_parameters(), lm_b.parameters()):
        assert torch.equal(pa, pb), n
    # Checkpoint taken during the sensitivity warm-up also resumes (scores travel in the state).
    lm_c = load_model("tiny-random").lm
    for p in lm_c.parameters():
        p.requires_grad_(True)
    opt_c = builders.get_optimizer(builders.get_optim_parameter_groups(lm_c), _cfg())
    _run_step(lm_c, opt_c, seed=0)
    opt_d = builders.get_optimizer(builders.get_optim_parameter_groups(lm_c), _cfg())
    opt_d.load_state_dict(copy.deepcopy(opt_c.state_dict()))
    _run_step(lm_c, opt_d, seed=1)
    assert sum(i.numel() for i in opt_d.pivots().values()) > 0


def test_bad_config(patched):
    from audiocraft.solvers import builders

    lm = load_model("tiny-random").lm
    cfg = _cfg()
    cfg.ppt.ratio = 0.0
    with pytest.raises(ValueError, match="ratio"):
        builders.get_optimizer(builders.get_optim_parameter_groups(lm), cfg)
