"""SensitivityAccumulator: score the in-scope entries during ordinary forward/backward passes, then pick pivots.

Each in-scope parameter gets a `register_post_accumulate_grad_hook`: as soon as its gradient is complete the hook
adds ``f(g)`` over the in-scope rows into a score buffer (through `ppt_fast.sensitivity_accumulate`) and frees the
gradient (``p.grad = None``). So at most one dense gradient per parameter lives at a time, never the full set.

Scores accumulate per backward call: with gradient accumulation over micro-batches, ``grad_sq`` sums the squares of
the micro-batch gradients. Under DDP the hooks see each process's local gradient; call `all_reduce()` before
`pivots()` so every process picks the same set.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .ops import select_pivots, sensitivity_accumulate
from .ops.sensitivity_accumulate import MODES, SCORE_DTYPES
from .pivots import PivotSet
from .scope import Scope, ScopeEntry, ScopeSpec, _named

logger = logging.getLogger(__name__)


class SensitivityAccumulator:
    """Accumulate sensitivity scores for the in-scope rows of a model's parameters.

    Args:
        model: an `nn.Module` (or a list of (name, parameter) pairs).
        scope: where pivots may be: a preset name, rule strings, a callable or a `Scope` (see `ppt_fast.scope`).
        mode: ``grad_sq`` (Σg², the diagonal Fisher; the default: it ranks by how much the loss reacts, is
            sign-free and robust to batch-to-batch sign flips), ``grad_abs`` (Σ|g|), ``taylor`` (Σ|g·θ|) or
            ``sgd_delta`` (|Σg|).
        score_dtype: float32 (default) or bfloat16 score buffers.
        freeze_others: turn ``requires_grad`` off on parameters outside the scope while accumulating (so backward
            skips their weight gradients) and on on in-scope ones; restored by `remove()`. Give
            ``freeze_others=False`` when other parameters must keep their gradients (e.g. trained at the same time).
        hooks: score in backward (the default). False: install nothing and change no ``requires_grad``; the caller
            scores the gradients where it sees them with `accumulate_grads()` (e.g. an optimizer's `step()`, after
            clipping), and the gradients stay in ``p.grad``.

    Score buffers: ``scores[name]`` is shaped like the in-scope row slice of the parameter (``[rows, *shape[1:]]``).
    Use as a context manager, or call `remove()` when done.
    """

    def __init__(
        self,
        model: Any,
        scope: ScopeSpec,
        mode: str = "grad_sq",
        score_dtype: torch.dtype = torch.float32,
        *,
        freeze_others: bool = True,
        hooks: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        if score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype={score_dtype} is not supported; use torch.float32 or torch.bfloat16")
        self.scope = Scope.of(scope)
        self.mode = mode
        self.score_dtype = score_dtype
        named = _named(model)
        self.entries: list[ScopeEntry] = self.scope.resolve(named)
        if not self.entries:
            raise ValueError(
                f"scope {self.scope!r} selects no parameter of the model; check the name globs against "
                "model.named_parameters() (audiocraft names look like 'transformer.layers.0.self_attn.in_proj_weight')"
            )
        self.scores: dict[str, torch.Tensor] = {
            e.name: torch.zeros(e.slice_shape, dtype=score_dtype, device=e.param.device) for e in self.entries
        }
        self._calls = [0] * len(self.entries)
        self._saved_requires_grad: list[tuple[torch.Tensor, bool]] = []
        in_scope = {id(e.param) for e in self.entries}
        for _, p in named if hooks else ():
            if id(p) in in_scope:
                if not p.requires_grad:
                    self._saved_requires_grad.append((p, False))
                    p.requires_grad_(True)
            elif freeze_others and p.requires_grad:
                self._saved_requires_grad.append((p, True))
                p.requires_grad_(False)
        self._handles = (
            [e.param.register_post_accumulate_grad_hook(self._hook(i)) for i, e in enumerate(self.entries)]
            if hooks
            else []
        )
        self._removed = False
        logger.debug("SensitivityAccumulator: %d tensors, %d entries in scope", len(self.entries), self.numel)

    def _hook(self, i: int):
        entry = self.entries[i]
        score = self.scores[entry.name]
        mode = self.mode

        def hook(p: torch.Tensor) -> None:
            g = p.grad
            if g is None:
                return
            with torch.no_grad():
                params = [entry.view(p.detach())] if mode == "taylor" else None
                sensitivity_accumulate([score], [entry.view(g)], params=params, mode=mode)
            p.grad = None
            self._calls[i] += 1

        return hook

    def row_sink(self, name: str):
        """A `ppt_fast.rowgrad.RowGrads` sink for the in-scope tensor `name`: scores a block of rows of its gradient
        (the rows outside the scope are ignored). Each backward pass counts once per tensor, like the hook."""
        i = self.names.index(name)
        entry = self.entries[i]
        score = self.scores[name]
        s0, s1 = entry.rows
        mode = self.mode
        last = [-1]

        def sink(block: torch.Tensor, row0: int, generation: int) -> None:
            a, b = max(row0, s0), min(row0 + block.shape[0], s1)
            if a < b:
                params = [entry.param.detach()[a:b]] if mode == "taylor" else None
                sensitivity_accumulate([score[a - s0 : b - s0]], [block[a - row0 : b - row0]], params=params, mode=mode)
            if generation != last[0]:
                last[0] = generation
                self._calls[i] += 1

        return sink

    @torch.no_grad()
    def accumulate_grads(self) -> int:
        """Score the gradients the in-scope tensors hold now (``p.grad``, left in place; tensors without one are
        skipped), in one launch; returns how many tensors were scored. For callers that see the gradients somewhere
        else than in backward (``hooks=False``)."""
        scores, grads, params = [], [], []
        for i, e in enumerate(self.entries):
            g = e.param.grad
            if g is None:
                continue
            scores.append(self.scores[e.name])
            grads.append(e.view(g))
            params.append(e.view(e.param.detach()))
            self._calls[i] += 1
        if scores:
            sensitivity_accumulate(scores, grads, params=params if self.mode == "taylor" else None, mode=self.mode)
        return len(scores)

    # ---- facts ---------------------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Backward passes seen (the most hook calls of any in-scope tensor)."""
        return max(self._calls) if self._calls else 0

    @property
    def numel(self) -> int:
        """N: in-scope entries."""
        return sum(e.numel for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def reset(self) -> None:
        """Zero the scores and the step counter."""
        for s in self.scores.values():
            s.zero_()
        self._calls = [0] * len(self.entries)

    def all_reduce(self, group: Any = None) -> None:
        """Sum the scores over the processes of a torch.distributed group (call before `pivots()` under DDP)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for s in self.scores.values():
                dist.all_reduce(s, group=group)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The scores (references; ``torch.save`` it) and the backward passes each tensor has seen."""
        return {"mode": self.mode, "names": self.names, "scores": dict(self.scores), "calls": list(self._calls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume an accumulation from `state_dict()`; it must come from the same scope over the same tensors."""
        if state.get("mode") != self.mode or list(state.get("names", ())) != self.names:
            raise ValueError(
                "SensitivityAccumulator.load_state_dict: the state belongs to another accumulator (mode "
                f"{state.get('mode')!r}, {len(state.get('names', ()))} tensors; here {self.mode!r}, "
                f"{len(self.names)}); resume with the same model, scope and mode"
            )
        for name, score in self.scores.items():
            saved = state["scores"][name]
            if tuple(saved.shape) != tuple(score.shape):
                raise ValueError(f"SensitivityAccumulator.load_state_dict: scores of {name!r} have shape "
                                 f"{tuple(saved.shape)}, expected {tuple(score.shape)}")  # fmt: skip
            score.copy_(saved)
        self._calls = [int(c) for c in state["calls"]]

    # ---- selection -----------------------------------------------------------------------------------------------
    def pivots(self, ratio: float | None = None, count: int | None = None, per_tensor: bool = False) -> PivotSet:
        """The pivots: a global top-k by |score| over all in-scope entries (`ppt_fast.select_pivots`).

        Args:
            ratio: k = max(1, round(ratio * N)) with N the in-scope entries; or `count`: exactly k. One of the two.
            per_tensor: select the ratio (or `count`) within each tensor instead.

        Returns a PivotSet over the in-scope tensors (whole-parameter names and shapes, in `named_parameters()`
        order) whose indices are flat indices into the **whole** parameter.
        """
        if self.steps == 0:
            raise RuntimeError(
                "no backward pass reached the in-scope parameters yet: run forward + loss.backward() on some batches "
                "inside the accumulator before calling pivots()"
            )
        local = select_pivots(
            [self.scores[e.name] for e in self.entries],
            ratio=ratio,
            count=count,
            names=self.names,
            per_tensor=per_tensor,
        )
        idx = local.indices
        parts = []
        for i, e in enumerate(self.entries):
            lo = e.flat_range[0]
            part = local.indices_of(i)
            parts.append(part + lo if lo else part)
        if parts:
            idx = torch.cat(parts)
        return PivotSet(self.names, [e.param.shape for e in self.entries], local.offsets, idx)

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach the hooks and restore every ``requires_grad`` this accumulator changed (the scores stay)."""
        if self._removed:
            return
        for h in self._handles:
            h.remove()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._handles = []
        self._saved_requires_grad = []
        self._removed = True

    def __enter__(self) -> SensitivityAccumulator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"SensitivityAccumulator({len(self.entries)} tensors, {self.numel} entries, mode={self.mode!r}, "
            f"steps={self.steps})"
        )
