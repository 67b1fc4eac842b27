"""Reference audio -> checked, resampled, segmented, encoded (once, cached) training codes.

A reference may be a path (anything soundfile reads; any sample rate and channel count) or a `(tensor [C, T],
sample_rate)` pair. It is resampled (julius) and mixed to the model's format, checked, cut into overlapping
segments, encoded by the model's compression model, and the codes are cached under
`$PPT_FAST_CACHE/encoded/<key>.pt` with key = sha256(file bytes or samples, compression-model fingerprint,
segment settings).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import torch

from .. import _env
from .._io import atomic_write
from ..audio import SILENCE_RMS, AudioError, read_audio, to_model_format
from .models import module_device

logger = logging.getLogger(__name__)

MIN_SECONDS = 1.0  # shortest usable reference


@dataclass
class EncodedReference:
    """Training codes of one reference: `codes` int64 `[N, K, F]` (N segments, K codebooks, F frames)."""

    codes: torch.Tensor
    source: str
    seconds: float
    cache_path: str | None


def load_reference(reference, sample_rate: int, channels: int) -> tuple[torch.Tensor, bytes, str]:
    """Read and check a reference; return (float32 `[channels, T]` at `sample_rate`, bytes for the cache key, name)."""
    if isinstance(reference, (str, os.PathLike)):
        path = os.fspath(reference)
        audio, sr = read_audio(path)
        with open(path, "rb") as f:
            key = hashlib.sha256(f.read()).digest()
        name = path
    elif isinstance(reference, tuple) and len(reference) == 2 and isinstance(reference[0], torch.Tensor):
        audio, sr = reference
        audio = audio.detach().float().cpu()
        if audio.dim() == 1:
            audio = audio[None]
        key = hashlib.sha256(audio.contiguous().numpy().tobytes() + str(int(sr)).encode()).digest()
        name = f"<tensor {tuple(audio.shape)} @ {sr} Hz>"
    else:
        raise AudioError(
            f"reference must be a path to an audio file or a (tensor [C, T], sample_rate) pair, got "
            f"{type(reference).__name__}"
        )
    check_audio(audio, int(sr), name)
    return to_model_format(audio, int(sr), sample_rate, channels), key, name


def check_audio(audio: torch.Tensor, sample_rate: int, name: str, min_seconds: float = MIN_SECONDS) -> None:
    """Raise AudioError for NaN/inf samples, silence, or a clip shorter than `min_seconds`."""
    if audio.dim() != 2 or audio.shape[-1] == 0:
        raise AudioError(f"reference {name} holds no samples")
    if not torch.isfinite(audio).all():
        bad = int((~torch.isfinite(audio)).sum())
        raise AudioError(f"reference {name} has {bad} NaN/inf samples; re-export it from your audio editor")
    seconds = audio.shape[-1] / sample_rate
    if seconds < min_seconds:
        raise AudioError(
            f"reference {name} is {seconds:.2f} s long; the minimum is {min_seconds:g} s (about 2 minutes works best)"
        )
    rms = float(audio.double().pow(2).mean().sqrt())
    if rms < SILENCE_RMS:
        raise AudioError(f"reference {name} is silent (RMS {rms:.2e} < {SILENCE_RMS:g}); check the file and its gain")


def segments(audio: torch.Tensor, sample_rate: int, seconds: float, hop_ratio: float = 0.5) -> torch.Tensor:
    """Cut `[C, T]` into `[N, C, S]` windows of `seconds` with hop `hop_ratio * seconds` (last window end-aligned).

    A clip shorter than one window becomes a single window of its own length.
    """
    size = int(round(seconds * sample_rate))
    T = audio.shape[-1]
    if T <= size:
        return audio[None]
    hop = max(1, int(size * hop_ratio))
    starts = list(range(0, T - size + 1, hop))
    if starts[-1] != T - size:
        starts.append(T - size)
    return torch.stack([audio[:, s : s + size] for s in starts])


def encode_reference(
    model, reference, *, segment_seconds: float, codec_fingerprint: str, use_cache: bool = True, batch: int = 8
) -> EncodedReference:
    """Load, check, segment and encode `reference` with `model.compression_model`; cache the codes."""
    audio, key_bytes, name = load_reference(reference, model.sample_rate, model.audio_channels)
    h = hashlib.sha256()
    h.update(key_bytes)
    h.update(codec_fingerprint.encode())
    h.update(f"{model.sample_rate}|{model.audio_channels}|{segment_seconds:.6f}|v1".encode())
    key = h.hexdigest()
    cache_path = os.path.join(_env.cache_dir(), "encoded", f"{key}.pt") if use_cache else None
    seconds = audio.shape[-1] / model.sample_rate
    if cache_path and os.path.isfile(cache_path):
        try:
            codes = torch.load(cache_path, map_location="cpu", weights_only=True)
            logger.info("reference %s: codes from cache %s", name, cache_path)
            return EncodedReference(codes, name, seconds, cache_path)
        except Exception as e:  # a truncated or foreign file: re-encode
            logger.warning("ignoring unreadable cache file %s (%s)", cache_path, e)
    segs = segments(audio, model.sample_rate, segment_seconds)
    device = module_device(model.compression_model)
    parts = []
    with torch.no_grad():
        for i in range(0, segs.shape[0], batch):
            codes, _scale = model.compression_model.encode(segs[i : i + batch].to(device))
            parts.append(codes.cpu().long())
    codes = torch.cat(parts)
    if cache_path:
        atomic_write(cache_path, lambda tmp: torch.save(codes, tmp))
    logger.info("reference %s: %.1f s -> %d segments of codes %s", name, seconds, codes.shape[0], tuple(codes.shape))
    return EncodedReference(codes, name, seconds, cache_path)
