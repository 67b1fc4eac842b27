"""`pattern_cross_entropy` against MusicGenSolver's own loss path (compute_predictions + _compute_cross_entropy)."""

import pytest
import torch

pytest.importorskip("audiocraft")

from tolerances import LOSS_FP32  # noqa: E402

from ppt_fast.hosts.audiocraft.build import _lm  # noqa: E402
from ppt_fast.hosts.audiocraft.loss import pattern_cross_entropy  # noqa: E402


def _solver_loss(lm, codes, tokenized):
    from audiocraft.solvers.musicgen import MusicGenSolver

    out = lm.compute_predictions(codes, [], lm.condition_provider(tokenized))
    mask = torch.ones_like(codes, dtype=torch.bool) & out.mask
    return MusicGenSolver._compute_cross_entropy(None, out.logits, codes, mask)


def _grads(lm, loss):
    lm.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


def _pattern(name, n_q):
    from audiocraft.modules import codebooks_patterns as cp

    return {
        "delay": lambda: cp.DelayedPatternProvider(n_q=n_q),
        "delay-uneven": lambda: cp.DelayedPatternProvider(n_q=n_q, delays=[0, 2, 3, 7][:n_q]),
        "parallel": lambda: cp.ParallelPatternProvider(n_q=n_q),
        "unrolled": lambda: cp.UnrolledPatternProvider(n_q=n_q),
        "coarse-first": lambda: cp.CoarseFirstPattern(n_q=n_q),
    }[name]()


@pytest.mark.parametrize(
    "pattern,n_q,card,batch,frames",
    [
        ("delay", 8, 128, 3, 50),  # the default model's layout (8 levels), small card
        ("delay", 4, 96, 1, 5),  # T = K + 1: one valid step for the last codebook
        ("delay", 2, 257, 2, 33),  # odd card and frame count
        ("delay-uneven", 4, 64, 2, 20),
        ("parallel", 3, 64, 2, 17),
        ("unrolled", 3, 64, 2, 9),
        ("coarse-first", 3, 64, 2, 11),
    ],
)
def test_equals_the_solver_loss_and_gradients(pattern, n_q, card, batch, frames):
    from audiocraft.modules.conditioners import ConditioningAttributes

    g = torch.Generator().manual_seed(n_q * 1000 + frames)
    torch.manual_seed(frames)
    lm = _lm(64, 4, 2, n_q=n_q, card=card, lut_bins=64, lut_dim=32, musicgen=False, dropout=0.0).eval()
    lm.pattern_provider = _pattern(pattern, n_q)
    codes = torch.randint(0, card, (batch, n_q, frames), generator=g)
    texts = ["warm piano", "fast drums, loud", "a piece of music"]
    tokenized = lm.condition_provider.tokenize(
        [ConditioningAttributes(text={"description": texts[i % 3]}) for i in range(batch)]
    )
    ref, ref_per = _solver_loss(lm, codes, tokenized)
    ref_g = _grads(lm, ref)
    got, got_per = pattern_cross_entropy(lm, codes, lm.condition_provider(tokenized))
    got_g = _grads(lm, got)
    rtol, atol = LOSS_FP32["loss"]
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(got_per, torch.stack(ref_per), rtol=rtol, atol=atol)
    assert not got_per.requires_grad
    assert set(got_g) == set(ref_g)
    rtol, atol = LOSS_FP32["grad"]
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=rtol, atol=atol, msg=n)


def test_no_valid_step_is_refused():
    lm = _lm(32, 2, 1, n_q=4, card=16, lut_bins=16, lut_dim=8, musicgen=False, dropout=0.0).eval()
    codes = torch.zeros(1, 4, 3, dtype=torch.long)  # delays 0..3: codebook 3 never gets a full context in 3 frames
    tensors = lm.condition_provider(lm.condition_provider.tokenize([_attrs("x")]))
    with pytest.raises(ValueError, match="no valid step.*longer segments"):
        pattern_cross_entropy(lm, codes, tensors)


def _attrs(text):
    from audiocraft.modules.conditioners import ConditioningAttributes

    return ConditioningAttributes(text={"description": text})


@pytest.mark.parametrize("weights", [(3.0, 1.0, 1.0, 1.0), (0.25, 2.0, 0.5, 7.0)])
def test_weighted_loss_is_the_weighted_mean_of_the_solver_per_codebook_losses(weights):
    from audiocraft.modules.conditioners import ConditioningAttributes

    torch.manual_seed(7)
    lm = _lm(64, 4, 2, n_q=4, card=96, lut_bins=64, lut_dim=32, musicgen=False, dropout=0.0).eval()
    codes = torch.randint(0, 96, (2, 4, 21))
    tokenized = lm.condition_provider.tokenize(
        [ConditioningAttributes(text={"description": t}) for t in ("warm piano", "fast drums")]
    )
    _, ref_per = _solver_loss(lm, codes, tokenized)  # detached: the solver's per-codebook values, for the mean
    out = lm.compute_predictions(codes, [], lm.condition_provider(tokenized))  # the same, with gradients
    per = [
        torch.nn.functional.cross_entropy(out.logits[:, k][out.mask[:, k]], codes[:, k][out.mask[:, k]])
        for k in range(4)
    ]
    torch.testing.assert_close(torch.stack(per).detach(), torch.stack(ref_per))
    want = sum(wi * p for wi, p in zip(weights, per)) / sum(weights)
    want_g = _grads(lm, want)
    got, got_per = pattern_cross_entropy(lm, codes, lm.condition_provider(tokenized), weights=weights)
    got_g = _grads(lm, got)
    rtol, atol = LOSS_FP32["loss"]
    torch.testing.assert_close(got.detach(), want.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(got_per.mean(), torch.stack(ref_per).mean().detach(), rtol=rtol, atol=atol)
    rtol, atol = LOSS_FP32["grad"]
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=rtol, atol=atol, msg=n)
    # equal weights are the solver's mean
    eq, _ = pattern_cross_entropy(lm, codes, lm.condition_provider(tokenized), weights=[2.0] * 4)
    torch.testing.assert_close(eq.detach(), got_per.mean(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.0, 1.0, 1.0), (1.0, float("nan"), 1.0, 1.0)])
def test_bad_codebook_weights_are_refused(weights):
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm = _lm(32, 2, 1, n_q=4, card=16, lut_bins=16, lut_dim=8, musicgen=False, dropout=0.0).eval()
    cond = lm.condition_provider(lm.condition_provider.tokenize([ConditioningAttributes(text={"description": "x"})]))
    with pytest.raises(ValueError, match="one finite weight > 0 per codebook"):
        pattern_cross_entropy(lm, torch.zeros(1, 4, 12, dtype=torch.long), cond, weights=weights)
