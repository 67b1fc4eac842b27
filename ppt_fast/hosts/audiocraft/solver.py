"""PPT inside audiocraft's own training loop, at its optimizer seam (opt-in and revertible).

`MusicGenSolver.build_model` builds its optimizer with
`builders.get_optimizer(builders.get_optim_parameter_groups(self.model), self.cfg.optim)`, looked up through the
module attribute at call time. `apply_ppt_to_audiocraft()` wraps both functions (Liger-Kernel's monkey_patch
style: the originals are kept and `revert_ppt_to_audiocraft()` puts them back):

- `get_optim_parameter_groups(model)` is unchanged except that it remembers the model, so the optimizer can name
  the unnamed tensors it receives (6 groups for MusicGen: other params, 4 code embeddings, the transformer);
- `get_optimizer(params, cfg)` returns a `PptSolverAdamW` (`optimizer_from_cfg`) when
  `cfg.optimizer == "ppt_sparse_adamw"` and defers to audiocraft's function otherwise.

The wrapping itself lives in `patches` with the other patches.

So a solver run selects PPT with `optim.optimizer=ppt_sparse_adamw` (and optionally `+optim.ppt.ratio=0.01`,
`+optim.ppt.scope=ppt|all`, `+optim.ppt.sensitivity_steps=8`, `+optim.ppt.criterion=grad_sq`), without editing
audiocraft.

`PptSolverAdamW` works with what a solver does to an optimizer: the first `sensitivity_steps` calls of `step()`
only accumulate sensitivity scores from the (clipped) gradients and leave the parameters alone; then it selects the
pivots globally (over the scope, across all groups) and runs the sparse AdamW step on them, with each group's own
`lr` (schedulers change `group["lr"]`), `betas`, `eps` and `weight_decay` (decay on pivots only), through the same
`SensitivityAccumulator` / `select_pivots` / `SparseAdamW` as `ppt_fast.tune`. `state_dict()` / `load_state_dict()`
carry the phase, the scores or the pivots, and the moments (checkpointing). Identifier tokens are
not part of this path (audiocraft's datasets carry plain descriptions); use `ppt_fast.tune` for those.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ...optim import SparseAdamW
from ...pivots import PivotSet

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "ppt_sparse_adamw"
_HPARAMS = ("lr", "betas", "eps", "weight_decay")  # per group, handed to the SparseAdamW at every step


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except Exception:  # omegaconf struct mode raises on missing keys
        return default
    return default if value is None else value


class PptSolverAdamW(torch.optim.Optimizer):
    """A torch Optimizer for audiocraft's solvers: sensitivity warm-up, then sparse AdamW on global pivots.

    The warm-up scores the gradients `step()` is handed (after the solver's clipping) with a
    `SensitivityAccumulator` (``hooks=False``); at its end `SensitivityAccumulator.pivots` selects the pivots
    globally (`select_pivots`) and a `SparseAdamW` over the same param groups trains them, with each group's
    current `lr`, `betas`, `eps` and `weight_decay` (schedulers change this optimizer's `param_groups`; they are
    handed on at every step). The same three pieces `ppt_fast.tune` runs; this class only adds the warm-up
    counting and the checkpoint format.

    Args:
        params: tensors or param groups (audiocraft passes 6 unnamed groups).
        lr, betas, eps, weight_decay: AdamW's (per group; weight decay acts on pivots only).
        ratio / count: pivots as a fraction of the entries in scope, or a fixed number.
        sensitivity_steps: how many `step()` calls only accumulate scores (no parameter changes).
        criterion: `grad_sq` | `grad_abs` | `taylor` | `sgd_delta` (see ppt_fast.sensitivity_accumulate).
        names: `{param: name}` to resolve the scope (given by the patched builders); without names, scope `ppt`
            falls back to every tensor (logged).
        scope: `ppt` (default) or `all`.

    A non-finite gradient at the pivots skips the step with a warning (`SparseAdamW(nonfinite="skip")`).
    """

    FORMAT = "ppt_fast.PptSolverAdamW/2"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        ratio: float | None = 0.01,
        count: int | None = None,
        sensitivity_steps: int = 8,
        criterion: str = "grad_sq",
        names: dict[torch.Tensor, str] | None = None,
        scope: str = "ppt",
    ) -> None:
        from ...scope import Scope
        from ...sensitivity import SensitivityAccumulator

        if count is None and (ratio is None or not 0 < ratio <= 1):
            raise ValueError(f"optim.ppt.ratio={ratio!r} must lie in (0, 1] (or give optim.ppt.count)")
        if sensitivity_steps < 1:
            raise ValueError(f"optim.ppt.sensitivity_steps={sensitivity_steps} must be >= 1")
        if scope not in ("ppt", "all"):
            raise ValueError(f"optim.ppt.scope={scope!r}: use 'ppt' or 'all'")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.ratio, self.count = ratio, count
        self.sensitivity_steps = int(sensitivity_steps)
        self.criterion = criterion
        names = names or {}
        resolved_scope = scope if (names or scope == "all") else "all"
        if resolved_scope != scope:
            logger.warning("PptSolverAdamW: parameter names unknown; pivots may lie in any tensor (scope 'all')")
        # Every tensor gets a name (its model name, or its position when the model is unknown), in group order.
        self._group_names = []
        position = 0
        for group in self.param_groups:
            self._group_names.append([names.get(p, f"param{position + i}") for i, p in enumerate(group["params"])])
            position += len(group["params"])
        named = [(n, p) for g, ns in zip(self.param_groups, self._group_names) for n, p in zip(ns, g["params"])]
        try:
            self._acc: SensitivityAccumulator | None = SensitivityAccumulator(
                named, Scope.preset(resolved_scope), mode=criterion, hooks=False
            )
        except ValueError:
            raise ValueError("PptSolverAdamW: the scope selects no tensor; check optim.ppt.scope") from None
        self._sparse: SparseAdamW | None = None
        self._calls = 0

    @property
    def sparse(self) -> SparseAdamW | None:
        """The SparseAdamW that trains the pivots (None during the warm-up)."""
        return self._sparse

    def _build_sparse(self, pivots: PivotSet) -> None:
        groups = [
            {"params": list(g["params"]), "param_names": ns, **{k: g[k] for k in _HPARAMS}}
            for g, ns in zip(self.param_groups, self._group_names)
        ]
        self._sparse = SparseAdamW(groups, pivots, lr=self.defaults["lr"], nonfinite="skip")
        self._acc = None  # the scores are not needed any more

    def _select(self) -> None:
        acc = self._acc
        if acc.steps == 0:
            raise RuntimeError("PptSolverAdamW: no gradient reached the scope during the sensitivity steps")
        pivots = acc.pivots(ratio=None if self.count is not None else self.ratio, count=self.count)
        logger.info("PptSolverAdamW: %d pivots of %d entries in scope", pivots.count, acc.numel)
        self._build_sparse(pivots)

    def pivots(self) -> dict[torch.Tensor, torch.Tensor]:
        """`{param: int32 flat indices}` of the selected pivots (empty before selection)."""
        out: dict[torch.Tensor, torch.Tensor] = {}
        for lay in self._sparse._layouts if self._sparse is not None else ():
            for ti, p in enumerate(lay.params):
                out[p] = lay.indices[lay.offsets[ti] : lay.offsets[ti + 1]]
        return out

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._calls += 1
        if self._calls <= self.sensitivity_steps:
            self._acc.accumulate_grads()
            if self._calls == self.sensitivity_steps:
                self._select()
            return loss
        for mine, theirs in zip(self.param_groups, self._sparse.param_groups):
            for key in _HPARAMS:
                theirs[key] = mine[key]
        self._sparse.step()
        return loss

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The phase (`step()` calls so far), the groups' hyperparameters, and the scores (during the warm-up) or
        the SparseAdamW's state with its pivots (after). Tensors are references; ``torch.save`` it."""
        groups = super().state_dict()["param_groups"]
        return {
            "format": self.FORMAT,
            "calls": self._calls,
            "param_groups": groups,
            "sensitivity": self._acc.state_dict() if self._acc is not None else None,
            "sparse": self._sparse.state_dict() if self._sparse is not None else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from `state_dict()` (same param groups and config)."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != self.FORMAT:
            raise ValueError(
                "PptSolverAdamW.load_state_dict: not a PptSolverAdamW checkpoint of this version (format "
                f"{state_dict.get('format') if isinstance(state_dict, dict) else type(state_dict).__name__!r}, "
                f"expected {self.FORMAT!r})"
            )
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"PptSolverAdamW.load_state_dict: {len(state_dict['param_groups'])} param groups saved, "
                             f"the optimizer has {len(self.param_groups)}")  # fmt: skip
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self._calls = int(state_dict["calls"])
        if state_dict["sparse"] is not None:
            self._build_sparse(_pivots_of(state_dict["sparse"], self.param_groups, self._group_names))
            self._sparse.load_state_dict(state_dict["sparse"])
        else:
            self._acc.load_state_dict(state_dict["sensitivity"])


def _pivots_of(sparse_state: dict, groups: list[dict], group_names: list[list[str]]) -> PivotSet:
    """The PivotSet a SparseAdamW state dict was made for (its groups' layouts, joined)."""
    shapes = {n: p.shape for g, ns in zip(groups, group_names) for n, p in zip(ns, g["params"])}
    names, offsets, parts = [], [0], []
    for gi in range(len(groups)):
        s = sparse_state["state"][gi]
        for ti, n in enumerate(s["names"]):
            names.append(n)
            offsets.append(offsets[-1] + s["offsets"][ti + 1] - s["offsets"][ti])
        parts.append(s["indices"])
    indices = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)
    return PivotSet(names, [shapes[n] for n in names], offsets, indices)


def optimizer_from_cfg(params: list, cfg: Any, names: dict[torch.Tensor, str]) -> PptSolverAdamW:
    """A PptSolverAdamW from audiocraft's optimizer config (`cfg.lr`, `cfg.adam.*`, `cfg.ppt.*`)."""
    adam = _cfg_get(cfg, "adam", {})
    ppt = _cfg_get(cfg, "ppt", {})
    return PptSolverAdamW(
        params, lr=float(cfg.lr), betas=tuple(_cfg_get(adam, "betas", (0.9, 0.95))),
        eps=float(_cfg_get(adam, "eps", 1e-8)), weight_decay=float(_cfg_get(adam, "weight_decay", 0.0)),
        ratio=_cfg_get(ppt, "ratio", 0.01), count=_cfg_get(ppt, "count", None),
        sensitivity_steps=int(_cfg_get(ppt, "sensitivity_steps", 8)), criterion=_cfg_get(ppt, "criterion", "grad_sq"),
        scope=_cfg_get(ppt, "scope", "ppt"), names=names,
    )  # fmt: skip
