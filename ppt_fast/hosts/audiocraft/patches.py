"""Every patch ppt_fast makes to audiocraft, each with its apply and its revert, in one place.

1. Identifier tokens: `install_identifiers(lm)` swaps the LM's condition provider's class for a subclass whose
   `tokenize` cuts registered identifiers out of the prompts and whose `forward` appends their embeddings
   (`ppt_fast.identifiers.IdentifierBank`), so `LMModel.forward`, `LMModel.generate` and `MusicGenSolver` all go
   through it; the bank is a plain attribute (`object.__setattr__`), out of `state_dict()` and the optimizer groups.
   Reverted by `uninstall_identifiers(lm)`.
2. Row-scoped gradients under per-layer checkpointing: `checkpoint_routing(lm, rg)` shadows
   `StreamingTransformer._apply_layer` with an instance attribute that runs torch checkpointing with
   `context_fn=rg.checkpoint_contexts` (the recomputation then sees the row-scoped linears); removed on exit.
   `activation_checkpointing(lm, on)` sets `transformer.checkpointing = "torch"` for the block and restores it.
3. The solver's optimizer seam: `apply_ppt_to_audiocraft()` wraps `audiocraft.solvers.builders.get_optimizer` and
   `get_optim_parameter_groups` (the originals kept; `revert_ppt_to_audiocraft()` puts them back), so
   `optim.optimizer=ppt_sparse_adamw` builds a `solver.PptSolverAdamW`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from ...concept.registry import BANK_ATTR
from ...identifiers import IdentifierBank

logger = logging.getLogger(__name__)

_KEY = "__ppt_fast_identifiers__"
_SOLVER_ORIGINAL: dict[str, Any] = {}
_LAST_MODEL: list[Any] = [None]


# ---------------------------------------------------------------------------------------------------------------------
# 1. Identifier tokens in the condition provider
# ---------------------------------------------------------------------------------------------------------------------
def _provider_class(base: type) -> type:
    """A subclass of the provider's class whose tokenize/forward route identifiers through the bank."""
    cache = _provider_class.__dict__.setdefault("_cache", {})
    if base in cache:
        return cache[base]

    def tokenize(self, inputs):  # noqa: ANN001 - audiocraft's signature
        bank: IdentifierBank | None = getattr(self, BANK_ATTR, None)
        if bank is None or not bank.identifiers():
            return base.tokenize(self, inputs)
        per_sample: list[list[str]] = []
        stripped = []
        for attr in inputs:
            text = attr.text.get(bank.attribute)
            clean, idents = bank.split(text)
            per_sample.append(idents)
            if idents:
                # Copy: never mutate the caller's ConditioningAttributes.
                attr = type(attr)(text=dict(attr.text), wav=dict(attr.wav), joint_embed=dict(attr.joint_embed))
                attr.text[bank.attribute] = clean
            stripped.append(attr)
        out = base.tokenize(self, stripped)
        out[_KEY] = per_sample
        return out

    def forward(self, tokenized):  # noqa: ANN001
        per_sample = tokenized.get(_KEY) if isinstance(tokenized, dict) else None
        if per_sample is not None:
            tokenized = {k: v for k, v in tokenized.items() if k != _KEY}
        out = base.forward(self, tokenized)
        bank: IdentifierBank | None = getattr(self, BANK_ATTR, None)
        if per_sample is not None and bank is not None and bank.attribute in out:
            cond, mask = out[bank.attribute]
            out[bank.attribute] = bank.append(cond, mask, per_sample)
        return out

    cls = type(f"PptFast{base.__name__}", (base,), {"tokenize": tokenize, "forward": forward, "_ppt_fast_base": base})
    cache[base] = cls
    return cls


def install_identifiers(lm: torch.nn.Module, dim: int | None = None, attribute: str = "description") -> IdentifierBank:
    """Attach an IdentifierBank to an audiocraft LMModel (idempotent); returns the bank. Reverted by
    `uninstall_identifiers`."""
    bank = getattr(lm, BANK_ATTR, None)
    if bank is not None:
        return bank
    provider = lm.condition_provider
    if attribute not in provider.conditioners:
        raise ValueError(
            f"the LM has no text conditioner named {attribute!r} (it has {list(provider.conditioners)}); "
            "identifier tokens need a text condition"
        )
    if dim is None:
        dim = provider.conditioners[attribute].output_dim
    fuser = getattr(lm, "fuser", None)
    if fuser is not None and getattr(fuser, "cross_attention_pos_emb", False):
        logger.warning(
            "this LM adds positional embeddings to the cross-attention source: identifier tokens are appended after "
            "the text, not placed at the identifier's position"
        )
    bank = IdentifierBank(dim, attribute)
    # Plain attribute (not a submodule): the bank's tensors stay out of lm.state_dict()/parameters(), so the base
    # model's fingerprint and audiocraft's optimizer groups are unchanged.
    object.__setattr__(lm, BANK_ATTR, bank)
    object.__setattr__(provider, BANK_ATTR, bank)
    if not hasattr(type(provider), "_ppt_fast_base"):
        provider.__class__ = _provider_class(type(provider))
    return bank


def uninstall_identifiers(lm: torch.nn.Module) -> None:
    """Remove the bank and restore the provider's original class."""
    provider = lm.condition_provider
    base = getattr(type(provider), "_ppt_fast_base", None)
    if base is not None:
        provider.__class__ = base
    for obj in (lm, provider):
        if BANK_ATTR in obj.__dict__:
            object.__delattr__(obj, BANK_ATTR)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Per-layer activation checkpointing, and row-scoped gradients under it
# ---------------------------------------------------------------------------------------------------------------------
class RoutingError(ValueError):
    """Row-scoped gradients asked for under a checkpointing method they cannot run with."""


@contextlib.contextmanager
def activation_checkpointing(lm: torch.nn.Module, enable: bool) -> Iterator[None]:
    """audiocraft's per-layer torch checkpointing for the block (activations recomputed in backward instead of kept:
    bitwise the same results, lower peak memory, one more forward per step); the LM's own setting comes back after."""
    transformer = getattr(lm, "transformer", None)
    saved = getattr(transformer, "checkpointing", None)
    if enable and saved is not None:
        transformer.checkpointing = "torch"
    try:
        yield
    finally:
        if saved is not None:
            transformer.checkpointing = saved


@contextlib.contextmanager
def checkpoint_routing(lm: torch.nn.Module, rg: Any) -> Iterator[None]:
    """While audiocraft's per-layer checkpointing is on (``transformer.checkpointing == "torch"``), run it with
    ``context_fn=rg.checkpoint_contexts`` so the recomputation in backward sees the row-scoped linears too."""
    transformer = getattr(lm, "transformer", None)
    method = getattr(transformer, "checkpointing", "none")
    if not len(rg) or method == "none":
        yield
        return
    if method != "torch":
        raise RoutingError(
            f"row-scoped gradients do not support audiocraft's {method!r} checkpointing; use checkpointing='torch' "
            "or tune(..., row_grads=False)"
        )
    from torch.utils.checkpoint import checkpoint

    def apply_layer(layer, *args, **kwargs):
        return checkpoint(layer, *args, use_reentrant=False, context_fn=rg.checkpoint_contexts, **kwargs)

    transformer._apply_layer = apply_layer  # instance attribute: shadows StreamingTransformer._apply_layer
    try:
        yield
    finally:
        del transformer._apply_layer


# ---------------------------------------------------------------------------------------------------------------------
# 3. The solver's optimizer builders
# ---------------------------------------------------------------------------------------------------------------------
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
    return _SOLVER_ORIGINAL["get_optim_parameter_groups"](model)


def _get_optimizer(params, cfg):  # noqa: ANN001 - audiocraft's signature
    from .solver import OPTIMIZER_NAME, _cfg_get, optimizer_from_cfg

    if _cfg_get(cfg, "optimizer", None) != OPTIMIZER_NAME:
        return _SOLVER_ORIGINAL["get_optimizer"](params, cfg)
    if isinstance(params, torch.nn.Module):
        params = _get_optim_parameter_groups(params)
    params = list(params)
    return optimizer_from_cfg(params, cfg, _names_for(params))


def apply_ppt_to_audiocraft() -> None:
    """Register `optim.optimizer=ppt_sparse_adamw` in audiocraft's solver builders (idempotent)."""
    from audiocraft.solvers import builders

    if _SOLVER_ORIGINAL:
        return
    _SOLVER_ORIGINAL["get_optimizer"] = builders.get_optimizer
    _SOLVER_ORIGINAL["get_optim_parameter_groups"] = builders.get_optim_parameter_groups
    builders.get_optimizer = _get_optimizer
    builders.get_optim_parameter_groups = _get_optim_parameter_groups


def revert_ppt_to_audiocraft() -> None:
    """Put audiocraft's original builders back (no-op when not applied)."""
    if not _SOLVER_ORIGINAL:
        return
    from audiocraft.solvers import builders

    builders.get_optimizer = _SOLVER_ORIGINAL.pop("get_optimizer")
    builders.get_optim_parameter_groups = _SOLVER_ORIGINAL.pop("get_optim_parameter_groups")
    _LAST_MODEL[0] = None


def is_applied() -> bool:
    """Whether `apply_ppt_to_audiocraft()` is in effect."""
    return bool(_SOLVER_ORIGINAL)
