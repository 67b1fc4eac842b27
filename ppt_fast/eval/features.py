"""Audio plumbing for the metrics: resampling, mono mixdown, segmenting, and the embedders.

Two embedders share one interface (:class:`Embedder`): ``musicnn`` (the ported MTT tagger's 200-d penultimate layer,
the default) and ``mfcc`` (weight-free MFCC statistics: a control that needs no checkpoint). Both cut a clip into
the same 3-s segments (musicnn's 187-frame patches at 16 kHz) and return one embedding per segment.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..audio import SILENCE_RMS
from . import musicnn

log = logging.getLogger(__name__)

EMBEDDERS = ("musicnn", "mfcc")


# --------------------------------------------------------------------------------------------------------------------
# Resampling.
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, width: int = 16, rolloff: float = 0.945) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc kernel [new, 1, K] (Hann window, `width` zero crossings each side, cutoff at
    rolloff * min(orig, new)/2), as in torchaudio's sinc_interp_hann."""
    base = min(orig, new) * rolloff
    pad = int(math.ceil(width * orig / base))
    idx = torch.arange(-pad, pad + orig, dtype=torch.float64)[None, :] / orig
    t = (-torch.arange(new, dtype=torch.float64)[:, None] / new + idx) * base
    t = t.clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    return kernel[:, None, :].to(torch.float32), pad


def resample(audio: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited resampling of ``[..., T]`` from `orig` to `new` Hz (float32) -> ``[..., ceil(T * new / orig)]``."""
    if orig <= 0 or new <= 0:
        raise ValueError(f"sample rates must be positive, got {orig} -> {new}")
    if orig == new:
        return audio.to(torch.float32)
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    kernel, pad = _sinc_kernel(o, n)
    lead, length = audio.shape[:-1], audio.shape[-1]
    x = torch.nn.functional.pad(audio.reshape(-1, 1, length).to(torch.float32), (pad, pad + o))
    y = torch.nn.functional.conv1d(x, kernel.to(x.device), stride=o)  # [N, n, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(n * length / o)
    return y[:, :target].reshape(*lead, target)


# --------------------------------------------------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------------------------------------------------


def as_batch(audio, name: str) -> torch.Tensor:
    """Accept ``[T]`` (mono), ``[C, T]`` or ``[B, C, T]`` (tensor or array) and return float32 ``[B, C, T]``."""
    x = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be float audio in [-1, 1], got dtype {x.dtype}")
    x = x.detach().to("cpu", torch.float32)
    if x.dim() == 1:
        x = x[None, None]
    elif x.dim() == 2:
        x = x[None]
    elif x.dim() != 3:
        raise ValueError(f"{name} must be [C, T] or [B, C, T], got shape {tuple(x.shape)}")
    if x.shape[1] > 8 and x.shape[2] <= 8:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: that looks like [.., T, C]; pass channels first [C, T]")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf samples")
    return x


def check_rate(sample_rate, name: str = "sample_rate") -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 4000:
        raise ValueError(f"{name}={sample_rate!r}: give the audio's sample rate in Hz as an int >= 4000 (e.g. 32000)")
    return int(sample_rate)


def to_mono_16k(audio: torch.Tensor, sample_rate: int) -> list[torch.Tensor]:
    """``[B, C, T]`` at `sample_rate` -> B mono clips ``[T']`` at 16 kHz (channels averaged)."""
    return list(resample(audio.mean(dim=1), sample_rate, musicnn.SAMPLE_RATE).unbind(0))


def fit_length(mono: torch.Tensor, pad: str, name: str) -> torch.Tensor:
    """Clips shorter than one 3-s window: ``pad='error'`` raises, ``pad='repeat'`` tiles the clip (musicnn's own
    training-time 'repeat-pad')."""
    need = musicnn.MIN_SAMPLES
    if mono.shape[-1] >= need:
        return mono
    if pad == "repeat":
        reps = math.ceil(need / mono.shape[-1])
        return mono.repeat(reps)[:need]
    if pad != "error":
        raise ValueError(f"pad={pad!r}: use 'error' or 'repeat'")
    raise ValueError(
        f"{name} is {mono.shape[-1] / musicnn.SAMPLE_RATE:.2f} s long; the embedders need >= "
        f"{need / musicnn.SAMPLE_RATE:.2f} s (one 3-s window): generate longer clips, or pass pad='repeat'"
    )


def segment_silence(mono: torch.Tensor) -> torch.Tensor:
    """Bool ``[n]``: which 187-frame segments of a 16-kHz clip are silent (RMS < -80 dBFS)."""
    span = musicnn.PATCH_FRAMES * musicnn.HOP
    n = 1 + (1 + mono.shape[-1] // musicnn.HOP - musicnn.PATCH_FRAMES) // musicnn.PATCH_FRAMES
    rms = []
    for i in range(n):
        seg = mono[i * span : (i + 1) * span]
        rms.append(seg.square().mean().sqrt() if seg.numel() else torch.tensor(0.0))
    return torch.stack(rms) < SILENCE_RMS


# --------------------------------------------------------------------------------------------------------------------
# Embedders.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedder:
    """``embed(mono_16k [T]) -> [n_segments, D]`` float32, one row per 3-s segment."""

    name: str
    dim: int

    def embed(self, mono: torch.Tensor) -> torch.Tensor:
        if self.name == "musicnn":
            return musicnn.embed_patches(mono).penultimate
        return mfcc_stats(mono)


def get_embedder(name: str) -> Embedder:
    if name == "musicnn":
        if not musicnn.is_available():
            raise ModuleNotFoundError(
                "embedder='musicnn' needs the musicnn checkpoint: `pip install --no-deps musicnn==0.1.0` "
                "(no TensorFlow), or pass embedder='mfcc' for the weight-free MFCC statistics"
            )
        return Embedder("musicnn", 200)
    if name == "mfcc":
        return Embedder("mfcc", 3 * N_MFCC)
    raise ValueError(f"embedder={name!r}: choose one of {', '.join(EMBEDDERS)}")


N_MFCC = 20


@functools.lru_cache(maxsize=2)
def _dct(n_in: int, n_out: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix [n_out, n_in] (scipy.fft.dct(norm='ortho') rows)."""
    k = torch.arange(n_out, dtype=torch.float64)[:, None]
    i = torch.arange(n_in, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi / n_in * (i + 0.5) * k) * math.sqrt(2.0 / n_in)
    m[0] /= math.sqrt(2.0)
    return m.to(torch.float32)


@torch.no_grad()
def mfcc_stats(mono: torch.Tensor) -> torch.Tensor:
    """Weight-free timbre statistics per 3-s segment: mean and std of MFCC 1..20 and std of their frame deltas
    (MFCC 0, the loudness, is left out) -> ``[n, 60]``. Same segmentation as musicnn."""
    db = 10.0 * torch.log10(musicnn.mel_power(mono).clamp_min(1e-10))  # [frames, 96]
    mfcc = db @ _dct(musicnn.N_MELS, N_MFCC + 1).T  # [frames, 21]
    segs = musicnn.patches(_pad_cols(mfcc[:, 1:]))[..., :N_MFCC]  # [n, 187, 20]
    delta = segs[:, 1:] - segs[:, :-1]
    return torch.cat([segs.mean(1), segs.std(1), delta.std(1)], dim=1)


def _pad_cols(x: torch.Tensor) -> torch.Tensor:
    """musicnn.patches() checks for 96 columns; pad the 20 MFCC columns to 96 to reuse its segmentation."""
    return torch.nn.functional.pad(x, (0, musicnn.N_MELS - x.shape[1]))


def embed_clips(
    clips: Sequence[torch.Tensor], embedder: Embedder, *, pad: str = "error", name: str = "audio"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each mono 16-kHz clip: (segment embeddings ``[n, D]``, silent mask ``[n]``)."""
    out = []
    for i, mono in enumerate(clips):
        mono = fit_length(mono, pad, f"{name}[{i}]" if len(clips) > 1 else name)
        out.append((embedder.embed(mono), segment_silence(mono)))
    return out
