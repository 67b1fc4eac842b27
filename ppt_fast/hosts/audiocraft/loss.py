"""MusicGen's training loss computed in the interleaving pattern's layout: same value, far less memory traffic.

`MusicGenSolver` computes its cross-entropy in three steps: `LMModel.compute_predictions` reverts the logits from
the pattern layout `[B, K, S, card]` to the codes' layout `[B, K, T, card]` (a concatenation and a gather over the
whole logits tensor), and `_compute_cross_entropy` then takes each codebook in turn (a strided select, a contiguous
copy and a boolean gather per codebook). In backward every select writes its gradient into a zero-filled tensor of
the full logits size, so K codebooks cost K full-size fills: quadratic in K. On the embedded default (K = 8, card
1024, batch 16 x 4-s crops: logits of 105 MB) these copies took ~40 % of a CPU training step.

:func:`pattern_cross_entropy` moves the **targets** instead of the logits: each code `(k, t)` that the pattern
places at sequence step `s` is predicted by the logits at `(k, s)` (the mapping audiocraft's
`revert_pattern_logits` uses, read from the same pattern), so the integer targets are scattered into the pattern
layout and one `cross_entropy` runs over the logits as the model produced them. The (logit row, target) pairs are
exactly the solver's, so the per-codebook means and their average are the same numbers up to summation order
(tests compare both, with their gradients, against `MusicGenSolver._compute_cross_entropy` on
`compute_predictions`, for the delay pattern and others).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def _target_layout(pattern, K: int, T: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat pattern positions `k * S + s` of the valid codes, their flat code positions `k * T + t`, valid codes per
    codebook), from the pattern's own revert indexes (`keep_only_valid_steps`, model output). Built on the CPU and
    moved once: no device-to-host sync inside the training step."""
    idx, mask = pattern._build_reverted_sequence_scatter_indexes(S, K, True, is_model_output=True, device="cpu")
    flat_mask = mask.reshape(-1)
    count = mask.sum(1)
    if bool((count == 0).any()):
        raise ValueError(f"{T} code frames leave no valid step for some of the {K} codebooks; use longer segments")
    pos, src = idx.reshape(-1)[flat_mask], torch.nonzero(flat_mask).reshape(-1)
    return pos.to(device, non_blocking=True), src.to(device, non_blocking=True), count.to(device, non_blocking=True)


def pattern_cross_entropy(lm, codes: torch.Tensor, condition_tensors,
                          weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """MusicGenSolver's loss on `codes` `[B, K, T]` (no padding): (mean over codebooks of each codebook's mean
    cross-entropy over its valid steps, the per-codebook values detached `[K]`). With `weights` (one per codebook,
    > 0) the first value is the weighted mean instead (pretraining's `codebook_weights`)."""
    B, K, T = codes.shape
    codes = codes.contiguous()
    pattern = lm.pattern_provider.get_pattern(T)
    sequence, _, _ = pattern.build_pattern_sequence(codes, lm.special_token_id, keep_only_valid_steps=True)
    S = sequence.shape[-1]
    pos, src, count = _target_layout(pattern, K, T, S, codes.device)  # before the forward: refuses a short T at once
    model = lm if getattr(lm, "_fsdp", None) is None else lm._fsdp
    logits = model(sequence, [], condition_tensors)  # [B, K, S, card]
    card = logits.shape[-1]
    targets = torch.full((B, K * S), IGNORE, dtype=torch.long, device=codes.device)
    targets[:, pos] = codes.reshape(B, K * T)[:, src]
    ce = F.cross_entropy(logits.reshape(B * K * S, card), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    per_codebook = ce.view(B, K, S).sum((0, 2)) / (count.to(ce.dtype) * B)
    if weights is None:
        return per_codebook.mean(), per_codebook.detach()
    w = torch.as_tensor(weights, dtype=per_codebook.dtype, device=per_codebook.device)
    if w.shape != (K,) or not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights={list(map(float, weights))} must give one finite weight > 0 per codebook ({K})")
    return (per_codebook * w).sum() / w.sum(), per_codebook.detach()
