"""The Host protocol: everything the tune loop and `generate()` need from a model library, and nothing more.

A host wraps one loaded text-to-music model of one library (`ppt_fast.hosts.audiocraft`,
`ppt_fast.hosts.transformers`). The tune loop (`ppt_fast.tuning`) is written against this protocol only: it picks
batches, runs the sensitivity pass, selects pivots and trains them with `SparseAdamW`; the host turns references into
codes, prompts into a loss, and knows where the attention projections' rows are (`scope`). Nothing above this layer
imports the model library.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..identifiers import IdentifierBank
from ..scope import Scope


@runtime_checkable
class Host(Protocol):
    """One loaded model of one library, as the tune loop and `generate()` see it.

    Attributes:
        library: the model library's name (`"audiocraft"`, `"transformers"`); concept files record it.
        model: the object the user holds (e.g. an audiocraft `MusicGen`): what concepts are applied to and what
            `tune()` tunes in place.
        lm: the `nn.Module` whose parameters are tuned; its `named_parameters()` names are the pivots' names.
        kind: `"trained"` (a model made by `ppt-fast pretrain`), `"tiny-random"` (the random-init test model) or
            `"other"`: which row of `ppt_fast.recipes.MODEL_DEFAULTS` supplies the defaults.
        sample_rate, channels, frame_rate: the audio the model makes and reads (Hz, channels, code frames per s).
        device: where `lm` lives.
    """

    library: str
    model: Any
    lm: torch.nn.Module
    kind: str
    sample_rate: int
    channels: int
    frame_rate: float
    device: torch.device

    def scope(self, preset: str) -> Scope:
        """The attention layout as a Scope: for preset `ppt`, the self-attention V rows and the cross-attention
        K/V rows of this library's projection weights (names as in `lm.named_parameters()`); for `dreamstyler`,
        the same with the cross-attention rows dense."""

    def trainable_names(self) -> list[str]:
        """The names of the `lm` parameters a recipe may train (`full` trains them all): the language model, not a
        frozen text encoder or codec that `lm` may also hold."""

    def fingerprint(self) -> str:
        """Digest of the LM's parameters and buffers (`ppt_fast.concept.state_digest`), recorded in a tune run."""

    def identifier_bank(self) -> IdentifierBank:
        """The identifier bank installed on the text conditioning (installed by the host when it loads a model)."""

    def text_embedding(self, text: str) -> torch.Tensor:
        """`[1, D]`: the text conditioner's output for `text`, averaged over its tokens (identifier token init)."""

    def encode_reference(self, reference: Any, segment_seconds: float, use_cache: bool,
                         progress: bool = False) -> torch.Tensor:  # fmt: skip
        """Load, check, segment and encode one reference (a path or `(audio, sample_rate)`): codes `[N, K, F]` on
        `device` (`ppt_fast.reference`; `progress`: a bar with an ETA). Bad audio raises `ppt_fast.audio.AudioError`
        before any work."""

    def encode_mix(self, references: Sequence[Any], segment_seconds: float, g: torch.Generator) -> torch.Tensor:
        """Codes of mixes of one random segment of each reference (targets for prompts naming several concepts)."""

    def loss(self, codes: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The library's own training loss (MusicGen: the solver's cross-entropy) of `codes` `[B, K, F]` under
        `prompts`, identifier tokens read from the bank; runs under the caller's autocast."""

    def sample_codes(self, prompts: Sequence[str], seconds: float) -> torch.Tensor:
        """Codes the model samples for `prompts` (its own sampling settings; the caller seeds the RNG)."""

    def row_grad_weights(self) -> dict[str, torch.Tensor]:
        """The LM weights row-scoped gradients can serve (`ppt_fast.rowgrad`), by name."""

    def training(self, rg: Any, *, activation_checkpointing: bool = False) -> contextlib.AbstractContextManager:
        """Context of a training phase: the library's activation checkpointing on when asked, and the row-scoped
        gradients of `rg` routed through it; everything restored on exit."""

    def set_sampling(self, duration: float, *, cfg_coef: float | None = None, top_k: int | None = None,
                     temperature: float | None = None, top_p: float | None = None) -> None:  # fmt: skip
        """Generation settings; None takes the model's own recommended setting."""

    def generate(self, prompts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        """float32 CPU audio `[B, C, T]` for `prompts` (the caller seeds the RNG)."""


__all__ = ["Host"]
