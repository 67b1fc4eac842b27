"""Audio I/O without ffmpeg: read any file soundfile reads, write WAVs atomically, and a synthetic reference clip.

Shapes: audio is float32 `[C, T]` with samples in [-1, 1]; `write_wav` writes one clip (`[C, T]`, `[T]` or a
batch of one `[1, C, T]`): write a batch item by item. Integer samples (a `(tensor, sample_rate)` reference of
int16, say) are rescaled by their type's range (`to_float`), never taken as floats peaking at 32767.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import stat
import warnings

import numpy as np
import torch

from ._io import atomic_write

logger = logging.getLogger(__name__)

#: RMS (about -80 dBFS) below which audio counts as silence: a reference is refused, a generated clip is flagged, an
#: evaluation segment is left out.
SILENCE_RMS = 1e-4

#: Above this many kernel entries `to_model_format` resamples with an FFT instead of julius. julius builds one
#: polyphase filter per output phase: `new * (old + 2 * width)` entries for the rates reduced by their gcd, in a
#: Python loop over `new`. Every common pair (8 to 192 kHz to 16 or 32 kHz) needs at most ~0.65 M (11.025 -> 32
#: kHz); an awkward one such as 44 099 -> 16 000 Hz would need 0.7 G entries (2.8 GB) and 16 000 iterations.
RESAMPLE_KERNEL_MAX = 4_000_000

# Integer sample types and the value that means full scale (unsigned 8-bit, the WAV convention, is centred on 128).
_INT_FULL_SCALE = {torch.uint8: 128.0, torch.int8: 128.0, torch.int16: 32768.0, torch.int32: 2.0**31}


class AudioError(ValueError):
    """A reference or output file cannot be used; the message says which file and what to do."""


def check_sample_rate(sample_rate, what: str = "audio") -> int:
    """`sample_rate` as an int; AudioError unless it is a whole number of Hz > 0 (an int, or a float like 16000.0)."""
    ok = isinstance(sample_rate, numbers.Integral) and not isinstance(sample_rate, bool)
    if isinstance(sample_rate, float) and math.isfinite(sample_rate) and sample_rate.is_integer():
        ok = True
    if not ok or int(sample_rate) <= 0:
        raise AudioError(
            f"{what}: sample rate {sample_rate!r} must be a whole number of Hz > 0 (e.g. 16000, 44100); pass "
            "(tensor, sample_rate) with the rate the samples were recorded at"
        )
    return int(sample_rate)


def to_float(audio, what: str = "audio") -> torch.Tensor:
    """Samples as a float32 CPU tensor (a numpy array or torch tensor of any real dtype, same shape). Integer types
    are rescaled by their range (int16 / 32768, int32 / 2**31, int8 / 128, uint8 (x - 128) / 128, the WAV
    conventions); int64, bool and complex samples have no audio convention and raise AudioError."""
    if isinstance(audio, np.ndarray):
        if audio.dtype.kind not in "biufc":
            raise AudioError(f"{what}: samples of numpy dtype {audio.dtype} are not audio; give float or int16 samples")
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if not isinstance(audio, torch.Tensor):
        raise AudioError(f"{what}: samples must be a torch tensor or numpy array, got {type(audio).__name__}")
    a = audio.detach().cpu()
    if a.dtype in _INT_FULL_SCALE:
        full = _INT_FULL_SCALE[a.dtype]
        return ((a.float() - 128.0) if a.dtype == torch.uint8 else a.float()) / full
    if a.dtype.is_floating_point:
        return a.float()
    raise AudioError(
        f"{what}: samples of dtype {a.dtype} have no audio convention; give floats in [-1, 1] or int16 / int32 PCM "
        "(e.g. tensor.to(torch.int16) if they are 16-bit values)"
    )


def _wav_promised_frames(path: str) -> int | None:
    """The frame count a RIFF/WAVE file's `data` chunk header promises (None: not such a file, or a streamed one
    whose writer left the size unset as 0 or 0xFFFFFFFF)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = 0
        for _ in range(64):  # a WAV holds a handful of chunks; a corrupt one must not loop long
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"fmt ":
                body = f.read(min(size, 16))
                if len(body) >= 14:
                    block_align = int.from_bytes(body[12:14], "little")
                f.seek(size - len(body) + (size & 1), 1)
            elif cid == b"data":
                if size in (0, 0xFFFFFFFF) or not block_align:
                    return None
                return size // block_align
            else:
                f.seek(size + (size & 1), 1)
    return None


def read_audio(path: str | os.PathLike, *, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """Read `path` with soundfile; return (float32 `[C, T]`, sample_rate). Raises AudioError when unreadable, when
    `path` is no regular file (a FIFO would block the read for ever), or when it is longer than `max_seconds` (checked
    from the header, before the samples are read). A WAV whose header promises more samples than the file holds (a
    truncated copy) is read as far as it goes, with a logged warning naming the file and both lengths."""
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"reference audio {path!r} does not exist")
    if os.path.isdir(path):
        raise AudioError(f"reference audio {path!r} is a directory; give an audio file (wav, flac, ogg, ...)")
    if not os.path.isfile(path):
        kind = "a FIFO" if stat.S_ISFIFO(os.stat(path).st_mode) else "not a regular file"
        raise AudioError(f"reference audio {path!r} is {kind}; give an audio file (wav, flac, ogg, ...)")
    try:
        info = sf.info(path)
        if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
            raise AudioError(
                f"reference audio {path!r} is {info.frames / info.samplerate:.0f} s long; the maximum is "
                f"{max_seconds:g} s: cut out the part to learn (about 2 minutes works best)"
            )
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # [T, C]
    except AudioError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the format
        raise AudioError(
            f"cannot read {path!r} as audio ({e}); use a format libsndfile reads (wav, flac, ogg, mp3 with "
            "libsndfile >= 1.1)"
        ) from e
    promised = _wav_promised_frames(path)
    if promised is not None and promised > data.shape[0]:
        logger.warning(
            "%s is truncated: its header promises %d samples (%.2f s), the file holds %d (%.2f s); using those",
            path, promised, promised / sr, data.shape[0], data.shape[0] / sr,
        )  # fmt: skip
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def _julius_kernel_entries(old: int, new: int) -> int:
    g = math.gcd(old, new)
    o, n = old // g, new // g
    width = math.ceil(24 * o / (min(o, n) * 0.945))  # julius.resample_frac's defaults: zeros=24, rolloff=0.945
    return n * (2 * width + o)


def _resample_fft(audio: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Band-limited resampling by the FFT (truncate or zero-pad the spectrum), to julius's output length
    `floor(T * new / old)`: for rate pairs julius would need a huge filter bank for. The clip is zero-padded to a
    whole number of `old / gcd` samples first, so the output spacing is exactly `1 / new` (resampling T samples to
    floor(T * new / old) would stretch time by up to one output sample and drift the phase)."""
    T = audio.shape[-1]
    g = math.gcd(old, new)
    o, q = old // g, new // g
    padded = -(-T // o) * o
    n = padded // o * q
    spec = torch.fft.rfft(audio.double(), n=padded)  # zero-pads to `padded`
    out = torch.zeros(*audio.shape[:-1], n // 2 + 1, dtype=spec.dtype)
    k = min(spec.shape[-1], out.shape[-1])
    out[..., :k] = spec[..., :k]
    return (torch.fft.irfft(out, n=n) * (n / padded))[..., : T * new // old].float()


def to_model_format(audio: torch.Tensor, sample_rate: int, target_rate: int, target_channels: int) -> torch.Tensor:
    """Resample `[C, T]` audio to `target_rate` (julius, as audiocraft does; an FFT for rate pairs whose julius
    filter bank would exceed RESAMPLE_KERNEL_MAX entries) and mix/duplicate to `target_channels`. Integer samples are
    rescaled (`to_float`); rates must be whole numbers of Hz > 0."""
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise AudioError(f"audio must be [channels, samples], got shape {shape}")
    sample_rate = check_sample_rate(sample_rate)
    target_rate = check_sample_rate(target_rate, "target")
    audio = to_float(audio)
    if audio.shape[0] != target_channels:
        if target_channels == 1:
            audio = audio.mean(0, keepdim=True)
        elif audio.shape[0] == 1:
            audio = audio.expand(target_channels, -1).contiguous()
        else:
            raise AudioError(f"cannot map {audio.shape[0]} channels to {target_channels}")
    if sample_rate != target_rate:
        if _julius_kernel_entries(sample_rate, target_rate) > RESAMPLE_KERNEL_MAX:
            logger.info("resampling %d -> %d Hz by FFT (julius would need a %d-entry filter bank)", sample_rate,
                        target_rate, _julius_kernel_entries(sample_rate, target_rate))  # fmt: skip
            return _resample_fft(audio, sample_rate, target_rate)
        import julius

        audio = julius.resample_frac(audio, sample_rate, target_rate)
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

    The file appears complete or not at all (`ppt_fast._io.atomic_write`: a temporary file in the same folder, then
    renamed); a path that is no regular file (a directory, a device such as /dev/null) raises UnwritablePathError.
    Integer samples are taken by their range (`to_float`: int16 is written through as is).
    Returns the path written.
    """
    import soundfile as sf

    path = os.fspath(path)
    a = to_float(audio, "write_wav")
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
    sample_rate = check_sample_rate(sample_rate, "write_wav")
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
