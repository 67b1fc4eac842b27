"""Audio I/O without ffmpeg: read any file soundfile reads, write WAVs atomically, and a synthetic reference clip.

Shapes: audio is float32 `[C, T]` with samples in [-1, 1]; `write_wav` writes one clip (`[C, T]`, `[T]` or a
batch of one `[1, C, T]`): write a batch item by item.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from ._io import atomic_write

#: RMS (about -80 dBFS) below which audio counts as silence: a reference is refused, a generated clip is flagged, an
#: evaluation segment is left out.
SILENCE_RMS = 1e-4


class AudioError(ValueError):
    """A reference or output file cannot be used; the message says which file and what to do."""


def read_audio(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """Read `path` with soundfile; return (float32 `[C, T]`, sample_rate). Raises AudioError when unreadable."""
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"reference audio {path!r} does not exist")
    if os.path.isdir(path):
        raise AudioError(f"reference audio {path!r} is a directory; give an audio file (wav, flac, ogg, ...)")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # [T, C]
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the format
        raise AudioError(
            f"cannot read {path!r} as audio ({e}); use a format libsndfile reads (wav, flac, ogg, mp3 with "
            "libsndfile >= 1.1)"
        ) from e
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def to_model_format(audio: torch.Tensor, sample_rate: int, target_rate: int, target_channels: int) -> torch.Tensor:
    """Resample `[C, T]` audio to `target_rate` (julius, as audiocraft does) and mix/duplicate to `target_channels`."""
    if audio.dim() != 2:
        raise AudioError(f"audio must be [channels, samples], got shape {tuple(audio.shape)}")
    audio = audio.float()
    if audio.shape[0] != target_channels:
        if target_channels == 1:
            audio = audio.mean(0, keepdim=True)
        elif audio.shape[0] == 1:
            audio = audio.expand(target_channels, -1).contiguous()
        else:
            raise AudioError(f"cannot map {audio.shape[0]} channels to {target_channels}")
    if sample_rate != target_rate:
        import julius

        audio = julius.resample_frac(audio, int(sample_rate), int(target_rate))
    return audio


def fit_peak(*clips: torch.Tensor, limit: float = 0.99) -> tuple[list[torch.Tensor], float]:
    """Scale `clips` down by one common gain so that none peaks above `limit` (never up): generated audio can exceed
    [-1, 1] (a decoder returns whatever level its output implies), and `write_wav` would clip it. One gain for all
    keeps clips that are compared (with / without a concept) at their relative levels. Returns (clips, gain)."""
    if not 0 < limit <= 1:
        raise ValueError(f"limit must be in (0, 1], got {limit}")
    peak = max((float(c.detach().abs().max()) for c in clips if c.numel()), default=0.0)
    if not math.isfinite(peak):
        raise AudioError("fit_peak: audio holds NaN or inf samples")
    gain = limit / peak if peak > limit else 1.0
    return [c * gain if gain != 1.0 else c for c in clips], gain


def write_wav(path: str | os.PathLike, audio: torch.Tensor, sample_rate: int) -> str:
    """Write `audio` (`[C, T]`, `[T]`, or `[1, C, T]`; float, clipped to [-1, 1] with a warning naming `fit_peak`) as
    16-bit PCM WAV, atomically.

    The file appears complete or not at all (written to a temporary file in the same folder, then renamed).
    Returns the path written.
    """
    import soundfile as sf

    path = os.fspath(path)
    a = audio.detach().float().cpu()
    if a.dim() == 3:
        if a.shape[0] != 1:
            raise AudioError(f"write_wav writes one clip; got a batch of {a.shape[0]}: write each audio[i]")
        a = a[0]
    if a.dim() == 1:
        a = a[None]
    if a.dim() != 2:
        raise AudioError(f"write_wav: audio must be [C, T], got shape {tuple(audio.shape)}")
    if not torch.isfinite(a).all():
        raise AudioError("write_wav: audio holds NaN or inf samples")
    if sample_rate <= 0:
        raise AudioError(f"write_wav: sample_rate must be positive, got {sample_rate}")
    over = int((a.abs() > 1).sum())
    if over:
        warnings.warn(f"write_wav: {over} samples above full scale (peak {float(a.abs().max()):.2f}) are clipped to "
                      "[-1, 1]; scale the audio with ppt_fast.audio.fit_peak first to keep its waveform",
                      stacklevel=2)  # fmt: skip
    samples = a.clamp(-1, 1).t().numpy()
    atomic_write(path, lambda tmp: sf.write(tmp, samples, int(sample_rate), subtype="PCM_16", format="WAV"))
    return path


def synth_reference(
    seconds: float = 12.0, sample_rate: int = 16000, *, seed: int = 0, timbre: str = "pluck"
) -> torch.Tensor:
    """A synthetic musical clip `[1, T]` float32: a melody with a fixed timbre, deterministic from `seed`.

    timbre: "pluck" (decaying harmonics, a plucked-string colour), "organ" (steady odd harmonics),
    "bell" (inharmonic partials). Notes follow a pentatonic random walk at 120 bpm, eighth notes.
    """
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sample_rate)
    out = torch.zeros(n)
    note_len = int(0.25 * sample_rate)
    scale = [0, 2, 4, 7, 9, 12, 14, 16]
    degree = 3
    t = torch.arange(note_len) / sample_rate
    partials = {
        "pluck": [(1.0, 1.0), (2.0, 0.5), (3.0, 0.3), (4.0, 0.2), (5.0, 0.1)],
        "organ": [(1.0, 1.0), (3.0, 0.5), (5.0, 0.3), (7.0, 0.2)],
        "bell": [(1.0, 1.0), (2.76, 0.6), (5.4, 0.4), (8.93, 0.25)],
    }
    if timbre not in partials:
        raise ValueError(f"timbre must be one of {sorted(partials)}, got {timbre!r}")
    decay = {"pluck": 8.0, "organ": 0.5, "bell": 3.0}[timbre]
    env = torch.exp(-decay * t) * (1 - torch.exp(-t * 400))
    for start in range(0, n - note_len + 1, note_len):
        step = int(torch.randint(-2, 3, (1,), generator=g))
        degree = min(max(degree + step, 0), len(scale) - 1)
        f0 = 220.0 * 2 ** (scale[degree] / 12)
        tone = sum(a * torch.sin(2 * math.pi * f0 * r * t) for r, a in partials[timbre] if f0 * r < sample_rate / 2)
        out[start : start + note_len] += env * tone
    out = out / out.abs().max().clamp_min(1e-9) * 0.5
    out += 0.003 * torch.randn(n, generator=g)
    return out[None].float()
