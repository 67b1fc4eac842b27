"""PPT inside audiocraft's own training loop, at its optimizer seam (opt-in and revertible).

`MusicGenSolver.build_model` builds its optimizer with
`builders.get_optimizer(builders.get_optim_parameter_groups(self.model), self.cfg.optim)`, looked up through the
module attribute at call time. `apply_ppt_to_audiocraft()` wraps both functions (Liger-Kernel's monkey_patch
style: the originals are kept and `revert_ppt_to_audiocraft()` puts them back):

- `get_optim_parameter_groups(model)` is unchanged except that it remembers the model, so the optimizer can name
  the unnamed tensors it receives (6 groups for MusicGen: other params, 4 code embeddings, the transformer);
- `get_optimizer(params, cfg)` returns a `PptSolverAdamW` when `cfg.optimizer == "ppt_sparse_adamw"` and defers to
  audiocraft's function otherwise.

So a solver run selects PPT with `optim.optimizer=ppt_sparse_adamw` (and optionally `+optim.ppt.ratio=0.01`,
`+optim.ppt.scope=ppt|all`, `+optim.ppt.sensitivity_steps=8`, `+optim.ppt.criterion=grad_sq`), without editing
audiocraft.

`PptSolverAdamW` works with what a solver does to an optimizer: the first `sensitivity_steps` calls of `step()`
only accumulate sensitivity scores from the (clipped) gradients and leave the parameters alone; then it selects the
pivots globally (over the scope, across all groups) and runs the sparse AdamW step on them, with each group's own
`lr` (schedulers change `group["lr"]`), `betas`, `eps` and `weight_decay` (decay on pivots only). `state_dict()` /
`load_state_dict()` carry the phase, the scores or the pivots, and the moments (checkpointing). Identifier tokens are
not part of this path (audiocraft's datasets carry plain descriptions); use `ppt_fast.tune` for those.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "ppt_sparse_adamw"
_ORIGINAL: dict[str, Any] = {}
_LAST_MODEL: list[Any] = [None]


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except Exception:  # omegaconf struct mode raises on missing keys
        return default
    return default if value is None else value


def scope_rows(name: str, param: torch.Tensor, scope: str) -> tuple[int, int] | None:
    """Rows of `param` where pivots may be: the `ppt` preset of `ppt_fast.scope` (self-attn V, cross-attn K/V rows;
    `d` read from the tensor) or `all`."""
    from ..scope import Scope

    if scope not in ("ppt", "all"):
        raise ValueError(f"optim.ppt.scope={scope!r}: use 'ppt' or 'all'")
    entries = Scope.preset(scope).resolve([(name, param)])
    return entries[0].rows if entries else None


class PptSolverAdamW(torch.optim.Optimizer):
    """A torch Optimizer for audiocraft's solvers: sensitivity warm-up, then sparse AdamW on global pivots.

    Args:
        params: tensors or param groups (audiocraft passes 6 unnamed groups).
        lr, betas, eps, weight_decay: AdamW's (per group; weight decay acts on pivots only).
        ratio / count: pivots as a fraction of the entries in scope, or a fixed number.
        sensitivity_steps: how many `step()` calls only accumulate scores (no parameter changes).
        criterion: `grad_sq` | `grad_abs` | `taylor` | `sgd_delta` (see ppt_fast.sensitivity_accumulate).
        names: `{param: name}` to resolve the scope (given by the patched builders); without names, scope `ppt`
            falls back to every tensor (logged).
        scope: `ppt` (default) or `all`.
    """

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
        if count is None and (ratio is None or not 0 < ratio <= 1):
            raise ValueError(f"optim.ppt.ratio={ratio!r} must lie in (0, 1] (or give optim.ppt.count)")
        if sensitivity_steps < 1:
            raise ValueError(f"optim.ppt.sensitivity_steps={sensitivity_steps} must be >= 1")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.ratio, self.count = ratio, count
        self.sensitivity_steps = int(sensitivity_steps)
        self.criterion = criterion
        names = names or {}
        resolved_scope = scope if (names or scope == "all") else "all"
        if resolved_scope != scope:
            logger.warning("PptSolverAdamW: parameter names unknown; pivots may lie in any tensor (scope 'all')")
        self._rows: dict[int, tuple[int, int] | None] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._rows[id(p)] = scope_rows(names.get(p, ""), p, resolved_scope)
        if not any(r is not None for r in self._rows.values()):
            raise ValueError("PptSolverAdamW: the scope selects no tensor; check optim.ppt.scope")
        self._calls = 0

    # The phase counter lives in the state of the first parameter so that state_dict() carries it.
    def _meta(self) -> dict:
        first = self.param_groups[0]["params"][0]
        st = self.state[first]
        st.setdefault("ppt_calls", torch.zeros((), dtype=torch.float64))
        return st

    def _scoped(self):
        for group in self.param_groups:
            for p in group["params"]:
                rows = self._rows.get(id(p))
                if rows is not None:
                    yield group, p, rows

    @torch.no_grad()
    def _accumulate(self) -> None:
        from ..ops import sensitivity_accumulate

        scores, grads, ps = [], [], []
        for _, p, (lo, hi) in self._scoped():
            if p.grad is None:
                continue
            st = self.state[p]
            if "score" not in st:
                st["score"] = torch.zeros((hi - lo, *p.shape[1:]) if p.dim() else (1,), device=p.device)
            scores.append(st["score"])
            g = p.grad[lo:hi] if p.dim() else p.grad.view(1)
            grads.append(g)
            ps.append(p.detach()[lo:hi] if p.dim() else p.detach().view(1))
        if scores:
            sensitivity_accumulate(scores, grads, params=ps, mode=self.criterion)

    @torch.no_grad()
    def _select(self) -> None:
        from ..ops import select_pivots

        entries = [(p, rows) for _, p, rows in self._scoped() if "score" in self.state[p]]
        if not entries:
            raise RuntimeError("PptSolverAdamW: no gradient reached the scope during the sensitivity steps")
        scores = [self.state[p]["score"] for p, _ in entries]
        sel = select_pivots(scores, ratio=None if self.count is not None else self.ratio, count=self.count)
        for i, (p, (lo, _hi)) in enumerate(entries):
            st = self.state[p]
            del st["score"]
            idx = sel.indices_of(i)
            if idx.numel() == 0:
                continue
            cols = p[0].numel() if p.dim() else 1
            st["indices"] = (idx + lo * cols).to(torch.int32).contiguous()
            st["exp_avg"] = torch.zeros(idx.numel(), device=p.device)
            st["exp_avg_sq"] = torch.zeros(idx.numel(), device=p.device)
            if p.dtype != torch.float32:
                st["master"] = p.detach().reshape(-1)[st["indices"].long()].float()
        logger.info("PptSolverAdamW: %d pivots of %d entries in scope", sel.count, sel.total)

    def pivots(self) -> dict[torch.Tensor, torch.Tensor]:
        """`{param: int32 flat indices}` of the selected pivots (empty before selection)."""
        params = [p for g in self.param_groups for p in g["params"]]
        return {p: self.state[p]["indices"] for p in params if "indices" in self.state[p]}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        from ..ops import sparse_adamw_step

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        meta = self._meta()
        calls = int(meta["ppt_calls"]) + 1
        meta["ppt_calls"].fill_(calls)
        if calls <= self.sensitivity_steps:
            self._accumulate()
            if calls == self.sensitivity_steps:
                self._select()
            return loss
        step = calls - self.sensitivity_steps
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                st = self.state.get(p, {})
                if "indices" not in st or p.grad is None:
                    continue
                # One call per parameter keeps every state tensor its own (what state_dict() stores per parameter).
                sparse_adamw_step(
                    [p], [p.grad], [0, st["indices"].numel()], st["indices"], st["exp_avg"], st["exp_avg_sq"],
                    st.get("master"), step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )  # fmt: skip
        return loss

    _OWN_KEYS = ("indices", "exp_avg", "exp_avg_sq", "master", "score", "ppt_calls")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every state tensor to the parameter's dtype (int32 indices would become fp32 and
        lose exactness past 2**24); ours are set aside, the rest goes through torch, then ours come back as saved."""
        import itertools

        own: dict[Any, dict] = {}
        rest: dict[Any, dict] = {}
        for pid, st in state_dict["state"].items():
            own[pid] = {k: v for k, v in st.items() if k in self._OWN_KEYS}
            rest[pid] = {k: v for k, v in st.items() if k not in self._OWN_KEYS}
        super().load_state_dict({**state_dict, "state": rest})
        id_map = dict(
            zip(
                itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                itertools.chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for pid, st in own.items():
            p = id_map[pid]
            for k, v in st.items():
                self.state[p][k] = v.to(p.device) if k != "ppt_calls" else v.to(torch.float64)


def _names_for(params: Any) -> dict[torch.Tensor, str]:
    model = _LAST_MODEL[0]() if _LAST_MODEL[0] is not None else None
    if model is None:
        return {}
    names = {p: n for n, p in model.named_parameters()}
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if not all(p in names for p in tensors):
        return {}
    return names


def _get_optim_parameter_groups(model):  # noqa: ANN001 - audiocraft's signature
    _LAST_MODEL[0] = weakref.ref(model)
    return _ORIGINAL["get_optim_parameter_groups"](model)


def _get_optimizer(params, cfg):  # noqa: ANN001
    if _cfg_get(cfg, "optimizer", None) != OPTIMIZER_NAME:
        return _ORIGINAL["get_optimizer"](params, cfg)
    import torch.nn as nn

    if isinstance(params, nn.Module):
        params = _get_optim_parameter_groups(params)
    params = list(params)
    names = _names_for(params)
    adam = _cfg_get(cfg, "adam", {})
    ppt = _cfg_get(cfg, "ppt", {})
    return PptSolverAdamW(
        params, lr=float(cfg.lr), betas=tuple(_cfg_get(adam, "betas", (0.9, 0.95))),
        eps=float(_cfg_get(adam, "eps", 1e-8)), weight_decay=float(_cfg_get(adam, "weight_decay", 0.0)),
        ratio=_cfg_get(ppt, "ratio", 0.01), count=_cfg_get(ppt, "count", None),
        sensitivity_steps=int(_cfg_get(ppt, "sensitivity_steps", 8)), criterion=_cfg_get(ppt, "criterion", "grad_sq"),
        scope=_cfg_get(ppt, "scope", "ppt"), names=names,
    )  # fmt: skip


def apply_ppt_to_audiocraft() -> None:
    """Register `optim.optimizer=ppt_sparse_adamw` in audiocraft's solver builders (idempotent)."""
    from audiocraft.solvers import builders

    if _ORIGINAL:
        return
    _ORIGINAL["get_optimizer"] = builders.get_optimizer
    _ORIGINAL["get_optim_parameter_groups"] = builders.get_optim_parameter_groups
    builders.get_optimizer = _get_optimizer
    builders.get_optim_parameter_groups = _get_optim_parameter_groups


def revert_ppt_to_audiocraft() -> None:
    """Put audiocraft's original builders back (no-op when not applied)."""
    if not _ORIGINAL:
        return
    from audiocraft.solvers import builders

    builders.get_optimizer = _ORIGINAL.pop("get_optimizer")
    builders.get_optim_parameter_groups = _ORIGINAL.pop("get_optim_parameter_groups")
    _LAST_MODEL[0] = None


def is_applied() -> bool:
    return bool(_ORIGINAL)
