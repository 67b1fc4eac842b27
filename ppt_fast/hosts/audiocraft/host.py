"""`AudiocraftHost`: the Host protocol (`ppt_fast.hosts.base`) for an audiocraft `MusicGen`.

Everything audiocraft-specific the tune loop and `generate()` need sits here or in this package: prompts become
`ConditioningAttributes`, the loss is the solver's cross-entropy in the pattern's layout (`loss`), references are
encoded by the compression model with a codes cache (`data`), the identifier bank and the checkpointing routes are
patches with their reverts (`patches`), and the attention layout is audiocraft's packed `in_proj_weight`
(`ppt_fast.scope`'s presets are written for its names).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ... import reference
from ...concept.fingerprint import state_digest
from ...identifiers import IdentifierBank, get_bank
from ...scope import Scope
from . import patches
from .loss import pattern_cross_entropy


def _attributes(prompts: Sequence[str]) -> list:
    from audiocraft.modules.conditioners import ConditioningAttributes

    return [ConditioningAttributes(text={"description": p}) for p in prompts]


class AudiocraftHost:
    """An audiocraft `MusicGen` (`model`) with an identifier bank installed (see `ppt_fast.hosts.base.Host`)."""

    library = "audiocraft"

    def __init__(self, model: Any, kind: str) -> None:
        patches.install_identifiers(model.lm)
        self.model = model
        self.lm = model.lm
        self.kind = kind
        self.sample_rate = int(model.sample_rate)
        self.channels = int(model.audio_channels)
        self.frame_rate = float(getattr(model, "frame_rate", 0) or 0)
        self._codec_fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    # ---- layout and identity -----------------------------------------------------------------------------------
    def scope(self, preset: str) -> Scope:
        return Scope.preset(preset)

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.lm.named_parameters()]  # the LMModel (T5 stays outside its parameters)

    def fingerprint(self) -> str:
        return state_digest(self.lm)

    def identifier_bank(self) -> IdentifierBank:
        return get_bank(self.lm)

    def text_embedding(self, text: str) -> torch.Tensor:
        cond = self.lm.condition_provider.conditioners[self.identifier_bank().attribute]
        with torch.no_grad():
            emb, mask = cond(cond.tokenize([text]))
            m = mask.to(emb.dtype).unsqueeze(-1)
            return (emb * m).sum(1) / m.sum(1).clamp_min(1)

    # ---- data ----------------------------------------------------------------------------------------------------
    def encode_reference(self, ref: Any, segment_seconds: float, use_cache: bool, progress: bool = False):
        if self._codec_fingerprint is None:
            self._codec_fingerprint = state_digest(self.model.compression_model)
        enc = reference.encode_reference(self.model, ref, segment_seconds=segment_seconds,
                                         codec_fingerprint=self._codec_fingerprint, use_cache=use_cache,
                                         progress=progress)  # fmt: skip
        return enc.codes.to(self.device)

    def encode_mix(self, references: Sequence[Any], segment_seconds: float, g: torch.Generator) -> torch.Tensor:
        return reference.encode_mix(self.model, references, segment_seconds, g).to(self.device)

    # ---- training ------------------------------------------------------------------------------------------------
    def loss(self, codes: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """`MusicGenSolver`'s loss (`compute_predictions`, `_compute_cross_entropy` on its mask), computed in the
        pattern's layout (`loss.pattern_cross_entropy`: the same value, tested)."""
        provider = self.lm.condition_provider
        tokenized = provider.tokenize(_attributes(prompts))
        ce, _ = pattern_cross_entropy(self.lm, codes, provider(tokenized))
        return ce

    def sample_codes(self, prompts: Sequence[str], seconds: float) -> torch.Tensor:
        self.set_sampling(seconds)
        with torch.no_grad():
            _, codes = self.model.generate(list(prompts), return_tokens=True)
        return codes.to(self.device).long()

    def row_grad_weights(self) -> dict[str, torch.Tensor]:
        """The packed ``in_proj_weight`` of audiocraft's custom attention (``StreamingMultiheadAttention(custom=True)``,
        what MusicGen's memory-efficient layers use), which projects with ``F.linear`` on the whole weight
        (self-attention) or on row slices of it (cross-attention)."""
        out = {}
        for mname, mod in self.lm.named_modules():
            if type(mod).__name__ == "StreamingMultiheadAttention" and getattr(mod, "custom", False):
                w = getattr(mod, "in_proj_weight", None)
                if isinstance(w, torch.Tensor) and w.dim() == 2:
                    out[f"{mname}.in_proj_weight" if mname else "in_proj_weight"] = w
        return out

    @contextlib.contextmanager
    def training(self, rg: Any, *, activation_checkpointing: bool = False) -> Iterator[None]:
        with patches.activation_checkpointing(self.lm, activation_checkpointing):
            with patches.checkpoint_routing(self.lm, rg):
                yield

    # ---- generation ----------------------------------------------------------------------------------------------
    def set_sampling(self, duration: float, *, cfg_coef: float | None = None, top_k: int | None = None,
                     temperature: float | None = None, top_p: float | None = None) -> None:  # fmt: skip
        mg = self.model
        own = getattr(mg, "_ppt_fast_sampling", {})  # a model's recommended settings (the trained default sets them)
        top_k = int(top_k if top_k is not None else own.get("top_k", 250))
        cfg_coef = float(cfg_coef if cfg_coef is not None else own.get("cfg_coef", 3.0))
        temperature = float(temperature if temperature is not None else own.get("temp", 1.0))
        top_p = float(top_p if top_p is not None else own.get("top_p", 0.0))
        mg.set_generation_params(
            duration=float(duration), top_k=min(top_k, mg.lm.card), cfg_coef=cfg_coef, temperature=temperature,
            top_p=top_p, extend_stride=min(18.0, mg.max_duration / 2),
        )  # fmt: skip

    def generate(self, prompts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        with torch.no_grad():
            return self.model.generate(list(prompts), progress=progress).float().cpu()


__all__ = ["AudiocraftHost"]
