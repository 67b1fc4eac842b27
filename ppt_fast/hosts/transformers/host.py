"""`TransformersHost`: the Host protocol (`ppt_fast.hosts.base`) for a Hugging Face `MusicgenForConditionalGeneration`.

- Reference audio is encoded by the model's own EnCodec (`audio_encoder`, at the bandwidth that gives the decoder's
  codebook count), through the same checked, cached path as every host (`ppt_fast.reference`).
- The loss is the model's own: `model(input_ids, attention_mask, labels=...)`, with the labels laid out in MusicGen's
  delay pattern as `generate()` reads it (`delay_labels`): codebook k delayed by k steps, the pattern's pad positions
  ignored, the per-codebook cross-entropies averaged (audiocraft's solver loss).
- Identifier tokens: cut from the prompt and appended after the text encoding, in the decoder's space
  (`patches.identifier_batch`).
- The attention layout: `ppt` = pivots over the decoder's self-attention `v_proj` and cross-attention (`encoder_attn`)
  `k_proj` / `v_proj`; `dreamstyler` = self-attention `v_proj` sparse, cross-attention `k_proj` / `v_proj` dense.
  `MusicgenMelodyForConditionalGeneration` has no cross-attention (the condition is a prefix of the sequence):
  `ppt` = pivots over the self-attention `k_proj` / `v_proj`; `dreamstyler` = those dense, `q_proj` sparse
  (`LAYOUT_MELODY`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ...concept.fingerprint import state_digest
from ...identifiers import IdentifierBank, get_bank
from ...reference import encode_mix, encode_reference
from ...scope import Scope
from . import patches

_DECODER_LAYERS = "*decoder.layers.*"
TRAINABLE = ("decoder.", "enc_to_dec_proj.")  # the language model; text_encoder and audio_encoder stay frozen
LAYOUT = {
    "ppt": ((f"{_DECODER_LAYERS}.self_attn.v_proj.weight", f"{_DECODER_LAYERS}.encoder_attn.k_proj.weight",
             f"{_DECODER_LAYERS}.encoder_attn.v_proj.weight"), ()),
    "dreamstyler": ((f"{_DECODER_LAYERS}.self_attn.v_proj.weight",),
                    (f"{_DECODER_LAYERS}.encoder_attn.k_proj.weight", f"{_DECODER_LAYERS}.encoder_attn.v_proj.weight")),
}  # fmt: skip
#: MusicgenMelody has no cross-attention: the chroma and the text (identifier tokens appended) are prepended to the
#: audio sequence and read through self-attention, whose keys and values play the part of cross-attention's; the
#: queries (the audio positions reading the prefix) take the sparse part of dreamstyler.
LAYOUT_MELODY = {
    "ppt": ((f"{_DECODER_LAYERS}.self_attn.k_proj.weight", f"{_DECODER_LAYERS}.self_attn.v_proj.weight"), ()),
    "dreamstyler": ((f"{_DECODER_LAYERS}.self_attn.q_proj.weight",),
                    (f"{_DECODER_LAYERS}.self_attn.k_proj.weight", f"{_DECODER_LAYERS}.self_attn.v_proj.weight")),
}  # fmt: skip


class _Codec:
    """The model's EnCodec as `ppt_fast.reference` reads a codec: `encode(audio) -> (codes [B, K, F], None)`."""

    def __init__(self, model: Any) -> None:
        self.encoder = model.audio_encoder
        self.num_codebooks = int(model.decoder.num_codebooks)
        self.cardinality = int(model.config.audio_encoder.codebook_size)
        self.frame_rate = float(model.config.audio_encoder.frame_rate)
        self.bandwidth = self._bandwidth(model)

    def _bandwidth(self, model: Any) -> float | None:
        bits = math.log2(self.cardinality)
        for bw in model.config.audio_encoder.target_bandwidths:
            if round(bw * 1000 / (self.frame_rate * bits)) == self.num_codebooks:
                return float(bw)
        return None

    def parameters(self):
        return self.encoder.parameters()

    def buffers(self):
        return self.encoder.buffers()

    def encode(self, audio: torch.Tensor):
        out = self.encoder.encode(audio, bandwidth=self.bandwidth)
        return out.audio_codes[0][:, : self.num_codebooks], None


class _ReferenceModel:
    """What `ppt_fast.reference` needs of a model (sample rate, channels, a codec)."""

    def __init__(self, host: TransformersHost) -> None:
        self.sample_rate = host.sample_rate
        self.audio_channels = host.channels
        self.compression_model = _Codec(host.model)


def delay_labels(model: Any, codes: torch.Tensor) -> torch.Tensor:
    """Training labels `[B, F + K - 1, K]` for codes `[B, K, F]` in MusicGen's delay pattern: codebook k's code t at
    step t + k, pad (ignored by the loss) where the pattern has none; `shift_tokens_right` of them is what the decoder
    reads, as in `generate()`."""
    dec = model.decoder
    B, K, F = codes.shape
    pad = int(model.config.decoder.pad_token_id)
    bos = torch.full((B * K, 1), int(model.config.decoder.decoder_start_token_id), dtype=torch.long,
                     device=codes.device)  # fmt: skip
    ids = torch.cat([bos, codes.reshape(B * K, F).long()], 1)
    # max_length F + K: row k holds pad at steps 0..k, its codes at k + 1 .. k + F, pad after; every step set.
    _, pattern = dec.build_delay_pattern_mask(ids, pad, max_length=F + K)
    return pattern[:, 1:].reshape(B, K, -1).transpose(1, 2)  # step 0 (all BOS / pad) is the decoder's start


class TransformersHost:
    """A transformers `MusicgenForConditionalGeneration` (`model`) and its tokenizer, identifier bank installed."""

    library = "transformers"

    def __init__(self, model: Any, tokenizer: Any, kind: str) -> None:
        #: a MusicgenMelodyForConditionalGeneration: the condition is a prefix of the sequence (LAYOUT_MELODY)
        self.melody = type(model).__name__.startswith("MusicgenMelody")
        self.layout = LAYOUT_MELODY if self.melody else LAYOUT
        patches.install_identifiers(model)
        self.model = model
        self.lm = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.sample_rate = int(model.config.audio_encoder.sampling_rate)
        self.channels = int(model.config.decoder.audio_channels)
        self.frame_rate = float(model.config.audio_encoder.frame_rate)
        self._sampling: dict[str, Any] = {}
        self._codec_fingerprint: str | None = None
        self._reference_model = _ReferenceModel(self)

    @property
    def device(self) -> torch.device:
        return next(self.model.decoder.parameters()).device

    # ---- layout and identity -----------------------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters() if n.startswith(TRAINABLE)]

    def scope(self, preset: str) -> Scope:
        if preset in self.layout:
            sparse, dense = self.layout[preset]
            return Scope(sparse, dense, name=preset)
        # Other presets ("all", "all-linear") over the language model only: not the frozen T5 encoder or EnCodec.
        base = Scope.preset(preset)
        rules = [lambda n, p, r=r: r(n, p) if n.startswith(TRAINABLE) else None for r in base.sparse]
        return Scope(rules, name=preset)

    def fingerprint(self) -> str:
        return state_digest(self.model)

    def identifier_bank(self) -> IdentifierBank:
        return get_bank(self.model)

    def text_embedding(self, text: str) -> torch.Tensor:
        enc = self.tokenizer([text], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        with torch.no_grad():
            h = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            if patches.uses_projection(self.model):
                h = self.model.enc_to_dec_proj(h)
            m = mask.to(h.dtype).unsqueeze(-1)
            return (h * m).sum(1) / m.sum(1).clamp_min(1)

    # ---- data ----------------------------------------------------------------------------------------------------
    def encode_reference(self, ref: Any, segment_seconds: float, use_cache: bool, progress: bool = False):
        if self._codec_fingerprint is None:
            self._codec_fingerprint = state_digest(self.model.audio_encoder)
        enc = encode_reference(self._reference_model, ref, segment_seconds=segment_seconds,
                               codec_fingerprint=self._codec_fingerprint, use_cache=use_cache,
                               progress=progress)  # fmt: skip
        return enc.codes.to(self.device)

    def encode_mix(self, references: Sequence[Any], segment_seconds: float, g: torch.Generator) -> torch.Tensor:
        return encode_mix(self._reference_model, references, segment_seconds, g).to(self.device)

    # ---- training ------------------------------------------------------------------------------------------------
    def loss(self, codes: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        labels = delay_labels(self.model, codes.to(self.device))
        with patches.identifier_batch(self.model, self.tokenizer, prompts) as (ids, mask):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), labels=labels)
        return out.loss

    def sample_codes(self, prompts: Sequence[str], seconds: float) -> torch.Tensor:
        self.set_sampling(seconds)
        captured: list[torch.Tensor] = []
        decoder = self.model.audio_encoder
        original = type(decoder).decode

        def decode(audio_codes, *args, **kwargs):  # noqa: ANN001 - EnCodec's signature
            captured.append(audio_codes)
            return original(decoder, audio_codes, *args, **kwargs)

        decoder.decode = decode
        try:
            self.generate(prompts)
        finally:
            del decoder.decode
        return captured[-1][0].to(self.device).long()

    def row_grad_weights(self) -> dict[str, torch.Tensor]:
        # The decoder's projections are separate nn.Linear weights whose every row is in scope: row-scoped gradients
        # would save nothing there.
        return {}

    @contextlib.contextmanager
    def training(self, rg: Any, *, activation_checkpointing: bool = False) -> Iterator[None]:
        if activation_checkpointing:
            raise ValueError(
                "activation_checkpointing is not supported on the transformers host yet (transformers checkpoints only "
                "in train mode, and tune runs the model in eval mode); tune without it"
            )
        yield

    # ---- generation ----------------------------------------------------------------------------------------------
    def set_sampling(self, duration: float, *, cfg_coef: float | None = None, top_k: int | None = None,
                     temperature: float | None = None, top_p: float | None = None) -> None:  # fmt: skip
        gc = self.model.generation_config
        cfg = float(cfg_coef if cfg_coef is not None else (gc.guidance_scale or 3.0))
        temp = float(temperature if temperature is not None else (gc.temperature or 1.0))
        k = min(int(top_k if top_k is not None else (gc.top_k or 250)), int(self.model.config.decoder.vocab_size))
        self._sampling = dict(
            max_new_tokens=max(1, math.ceil(duration * self.frame_rate)) + int(self.model.decoder.num_codebooks) - 1,
            guidance_scale=cfg if cfg > 1 else None,
            do_sample=temp > 0,
            top_k=k,
            top_p=float(top_p) if top_p else None,
        )  # fmt: skip
        if temp > 0:
            self._sampling["temperature"] = temp
        self._samples = max(1, round(duration * self.sample_rate))

    def generate(self, prompts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        if not self._sampling:
            self.set_sampling(5.0)
        with patches.identifier_batch(self.model, self.tokenizer, prompts) as (ids, mask), torch.no_grad():
            audio = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                        **self._sampling)  # fmt: skip
        return audio[..., : self._samples].float().cpu()


__all__ = ["LAYOUT", "LAYOUT_MELODY", "TransformersHost", "delay_labels"]
