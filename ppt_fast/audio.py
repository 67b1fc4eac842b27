"""Audio I/O without ffmpeg: read any file soundfile reads, write WAVs atomically, loudness-normalise, and a synthetic
reference clip.

Shapes: audio is float32 `[C, T]` with samples in [-1, 1]; `write_wav` writes one clip (`[C, T]`, `[T]` or a
batch of one `[1, C, T]`): write a batch item by item. Integer samples (a `(tensor, sample_rate)` reference of
int16, say) are rescaled by their type's range (`to_float`), never taken as floats peaking at 32767.

Output level. `ppt_fast.generate()` returns the model's raw output, at whatever level the decoder implies (peaks of
7 or 10, far above full scale, happen). `write_wav` therefore loudness-normalises by default
(`normalize="loudness"`, `loudness_normalize`): the clip's integrated loudness (ITU-R BS.1770-4, measured with
`pyloudnorm`) is brought to TARGET_LUFS = -14 LUFS, then lowered if needed so that its true peak (estimated by 4x
oversampling, `true_peak_db`) stays at or below PEAK_CEILING_DB = -1 dBTP. -14 LUFS is the reference level of the
streaming platforms (Spotify and YouTube play music at about -14 LUFS): loud enough to hear at once, at the same
level as other music, with headroom left under the ceiling, so that a typical clip is not limited and nothing clips,
in the WAV or after a lossy encoder. Clips that must keep their own level (a reference, a bit-exact copy) are written
with `normalize=None`; `normalize="peak"` scales only clips peaking above 0.99 down (`fit_peak`).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ._io import atomic_write

logger = logging.getLogger(__name__)

#: RMS (about -80 dBFS) below which audio counts as silence: a reference is refused, a generated clip is flagged, an
#: evaluation segment is left out.
SILENCE_RMS = 1e-4

#: Window (s) over which `silent_windows` measures RMS: a window below SILENCE_RMS is a silent stretch of audio.
SILENCE_WINDOW_SECONDS = 0.5

#: Shortest silent stretch (s; two windows) that `generate()` reports and, with `resample_silent`, samples again.
SILENT_STRETCH_SECONDS = 1.0

#: Integrated loudness (LUFS, ITU-R BS.1770-4) that `write_wav` and `loudness_normalize` bring a clip to by default: the
#: streaming platforms' reference level (module docstring).
TARGET_LUFS = -14.0

#: True-peak ceiling (dBTP) that a loudness-normalised clip never exceeds: a clip whose peaks would go above it at
#: TARGET_LUFS is turned down until they do not (and so ends up quieter than the target).
PEAK_CEILING_DB = -1.0

#: Oversampling factor of the true-peak estimate (`true_peak_db`): BS.1770-4 Annex 2's 4x.
TRUE_PEAK_OVERSAMPLE = 4

#: BS.1770's absolute gate (LUFS): a clip measuring below it (or -inf: digital silence) counts as silent and is not
#: brought up to the target (that would turn a noise floor or dither into loud noise).
LOUDNESS_GATE_LUFS = -70.0

#: The BS.1770 gating block (s): a shorter clip is measured as one block of its own length (`loudness_normalize`).
LOUDNESS_BLOCK_SECONDS = 0.4

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


def silent_windows(audio: torch.Tensor, sample_rate: int, window: float = SILENCE_WINDOW_SECONDS) -> torch.Tensor:
    """Which `window`-second windows of each clip are silent (RMS over the window and the channels below
    SILENCE_RMS): bool `[B, n]` for audio `[B, C, T]` (or `[C, T]` / `[T]`: one clip), `n = T // (window *
    sample_rate)`; a trailing part shorter than a window is not measured."""
    sample_rate = check_sample_rate(sample_rate)
    x = torch.as_tensor(audio).detach()
    x = x.reshape(1, -1) if x.dim() < 2 else x.reshape(1, *x.shape) if x.dim() == 2 else x
    x = x.reshape(x.shape[0], -1, x.shape[-1]).to(torch.float32)
    w = max(1, round(window * sample_rate))
    n = x.shape[-1] // w
    if n == 0:
        return torch.zeros(x.shape[0], 0, dtype=torch.bool)
    win = x[..., : n * w].reshape(x.shape[0], x.shape[1], n, w)
    return win.pow(2).mean(dim=(1, 3)).sqrt() < SILENCE_RMS


def silent_stretches(audio: torch.Tensor, sample_rate: int, *, window: float = SILENCE_WINDOW_SECONDS,
                     min_seconds: float = SILENT_STRETCH_SECONDS) -> list[list[tuple[float, float]]]:  # fmt: skip
    """The runs of silent windows (`silent_windows`) at least `min_seconds` long, per clip: `[(start_s, end_s), ...]`
    in time order; `[]` for a clip without one."""
    sil = silent_windows(audio, sample_rate, window)
    need = max(1, math.ceil(min_seconds / window - 1e-9))
    out: list[list[tuple[float, float]]] = []
    for row in sil.tolist():
        runs, start = [], None
        for i, s in enumerate([*row, False]):
            if s and start is None:
                start = i
            elif not s and start is not None:
                if i - start >= need:
                    runs.append((start * window, i * window))
                start = None
        out.append(runs)
    return out


def fit_peak(*clips: torch.Tensor, limit: float = 0.99) -> tuple[list[torch.Tensor], float]:
    """Scale `clips` down by one common gain so that none peaks above `limit` (never up): generated audio can exceed
    [-1, 1] (a decoder returns whatever level its output implies), and `write_wav(..., normalize=None)` would clip
    it. One gain for all keeps clips that are compared (with / without a concept) at their relative levels. Returns
    (clips, gain). `write_wav(..., normalize="peak")` applies it (limit 0.99) to one clip."""
    if not 0 < limit <= 1:
        raise ValueError(f"limit must be in (0, 1], got {limit}")
    peak = max((float(c.detach().abs().max()) for c in clips if c.numel()), default=0.0)
    if not math.isfinite(peak):
        raise AudioError("fit_peak: audio holds NaN or inf samples")
    gain = limit / peak if peak > limit else 1.0
    return [c * gain if gain != 1.0 else c for c in clips], gain


@dataclass(frozen=True)
class LoudnessReport:
    """What `loudness_normalize` did to a clip (`str()` says it in one line).

    measured_lufs: the loudness of the clip as given (-inf: digital silence, or below LOUDNESS_GATE_LUFS).
    gain_db: the gain applied (0.0: returned unchanged); `gain` is the same as a linear factor.
    true_peak_dbtp: the true peak (`true_peak_db`) of the clip returned (-inf: all zeros or empty).
    ceiling_limited: the true-peak ceiling, not the loudness target, set the gain: the clip is quieter than the target.
    output_lufs: the loudness of the clip returned (measured_lufs + gain_db).
    method: how the loudness was measured: "bs1770" (pyloudnorm's gated integrated loudness), "short" (a clip shorter
        than the 400-ms gating block: its K-weighted mean square as one block of its own length), "none" (no samples).
    silent: the clip measured below the gate (or holds no samples) and was not brought up to the target.
    """

    measured_lufs: float
    gain_db: float
    true_peak_dbtp: float
    ceiling_limited: bool
    output_lufs: float
    method: str
    silent: bool

    @property
    def gain(self) -> float:
        return 10.0 ** (self.gain_db / 20.0)

    def __str__(self) -> str:
        if self.method == "none":
            return "no samples: unchanged"
        how = " (clip under 400 ms: ungated K-weighted RMS)" if self.method == "short" else ""
        if self.silent:
            did = f"scaled by {self.gain_db:+.1f} dB to the true-peak ceiling" if self.gain_db else "unchanged"
            gate = f"below the {LOUDNESS_GATE_LUFS:g} LUFS gate"
            return f"silent (loudness {self.measured_lufs:.1f} LUFS, {gate}){how}: {did}"
        tail = ", limited by the true-peak ceiling" if self.ceiling_limited else ""
        return (f"loudness {self.measured_lufs:.1f} -> {self.output_lufs:.1f} LUFS{how} ({self.gain_db:+.1f} dB), true "
                f"peak {self.true_peak_dbtp:.1f} dBTP{tail}")  # fmt: skip


def _samples64(audio, what: str) -> np.ndarray:
    """`audio` (`[C, T]` or `[T]`, torch or numpy, float or integer PCM) as float64 numpy `[C, T]`; AudioError for
    another shape or for NaN/inf samples."""
    if isinstance(audio, torch.Tensor) and audio.dtype.is_floating_point:
        x = audio.detach().cpu().double().numpy()
    elif isinstance(audio, np.ndarray) and audio.dtype.kind == "f":
        x = np.asarray(audio, dtype=np.float64)
    else:
        x = to_float(audio, what).double().numpy()  # integer PCM by its range; anything else refused there
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise AudioError(f"{what}: audio must be [C, T] or [T], got shape {tuple(audio.shape)}; give one clip")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise AudioError(
            f"{what}: audio holds {bad} NaN or inf samples, which have no loudness; find where they come from (a "
            "diverged model, a division by zero), or replace them (torch.nan_to_num) if a few are expected"
        )
    return x


def _db(linear: float) -> float:
    return 20.0 * math.log10(linear) if linear > 0 else -math.inf


def _true_peak(x: np.ndarray, oversample: int) -> float:
    """Linear true peak of float64 `[C, T]`: the largest |sample| of the signal oversampled `oversample` times
    (scipy's polyphase FIR), or of the samples themselves if larger."""
    if x.size == 0:
        return 0.0
    peak = max(float(x.max()), -float(x.min()))
    if oversample > 1 and peak > 0:
        from scipy.signal import resample_poly

        up = resample_poly(x, oversample, 1, axis=-1)
        peak = max(peak, float(up.max()), -float(up.min()))
    return peak


def true_peak_db(audio, *, oversample: int = TRUE_PEAK_OVERSAMPLE) -> float:
    """True peak of `audio` (`[C, T]` or `[T]`, torch or numpy) in dBTP (dB relative to full scale 1.0): the peak of
    the waveform between the samples, estimated by `oversample`x oversampling (BS.1770-4 Annex 2: 4x; it can read up
    to ~0.7 dB low only for content right at Nyquist). -inf for all zeros; AudioError for NaN/inf samples."""
    if not isinstance(oversample, numbers.Integral) or isinstance(oversample, bool) or oversample < 1:
        raise ValueError(f"oversample must be a whole number >= 1, got {oversample!r}")
    return _db(_true_peak(_samples64(audio, "true_peak_db"), int(oversample)))


def _check_db(name: str, value, low: float, high: float) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ValueError(f"{name} must be a number of dB in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _measure_lufs(x: np.ndarray, sample_rate: int) -> tuple[float, str]:
    """Integrated loudness (LUFS) of float64 `[C, T]` (T > 0, C <= 5) and how it was measured ("bs1770" / "short")."""
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate)  # ITU-R BS.1770-4: K-weighting, 400-ms blocks, -70 / -10 LU gates
    if x.shape[-1] >= LOUDNESS_BLOCK_SECONDS * sample_rate:
        with np.errstate(all="ignore"):
            return float(meter.integrated_loudness(x.T)), "bs1770"
    # pyloudnorm refuses a clip shorter than one block. Measure it as one block of its own length, through the same
    # K-weighting filters (the meter's, applied in its order) and channel weights: its ungated K-weighted RMS.
    y = x.copy()
    for stage in meter._filters.values():
        y = np.stack([stage.apply_filter(ch) for ch in y])
    weights = np.array([1.0, 1.0, 1.0, 1.41, 1.41])[: y.shape[0]]  # BS.1770: L, R, C 1.0; Ls, Rs 1.41
    power = float((weights * np.mean(y * y, axis=-1)).sum())
    return (-0.691 + 10.0 * math.log10(power) if power > 0 else -math.inf), "short"


def _with_gain(audio, gain: float):
    """`audio` times `gain`, of the type, dtype, shape (and device) it came in; integer PCM rounded and clipped to its
    type's range (the ceiling keeps it inside)."""
    if gain == 1.0:
        return audio
    if isinstance(audio, np.ndarray) and audio.dtype.kind == "f":
        return (audio * gain).astype(audio.dtype, copy=False)
    if isinstance(audio, torch.Tensor) and audio.dtype.is_floating_point:
        return audio * gain
    t = torch.from_numpy(np.ascontiguousarray(audio)) if isinstance(audio, np.ndarray) else audio
    full = _INT_FULL_SCALE[t.dtype]
    y = to_float(t).double() * gain * full + (128.0 if t.dtype == torch.uint8 else 0.0)
    info = torch.iinfo(t.dtype)
    y = y.round().clamp(info.min, info.max).to(t.dtype)
    return y.numpy() if isinstance(audio, np.ndarray) else y.to(audio.device)


def loudness_normalize(
    audio, sample_rate: int, *, target_lufs: float = TARGET_LUFS, peak_ceiling_db: float = PEAK_CEILING_DB
) -> tuple[torch.Tensor | np.ndarray, LoudnessReport]:
    """Bring `audio` to `target_lufs` of integrated loudness, never letting its true peak exceed `peak_ceiling_db`.

    audio: `[C, T]` or `[T]` (up to 5 channels, BS.1770's L, R, C, Ls, Rs), a torch tensor or numpy array, float or
    integer PCM (taken by its range, `to_float`). Returns `(audio, report)`: the audio times one gain, of the same type,
    dtype, shape and device (integer PCM rounded), and a LoudnessReport of what was done.

    Loudness is ITU-R BS.1770-4 integrated loudness (`pyloudnorm.Meter(sample_rate)`: K-weighting, 400-ms blocks,
    gated). The gain brings it to `target_lufs` (default TARGET_LUFS, -14 LUFS: the streaming platforms' reference
    level, loud enough to hear, with headroom under the ceiling); if the clip's true peak (`true_peak_db`, 4x
    oversampled) would then be above `peak_ceiling_db` (default -1 dBTP), the gain is lowered until it sits exactly at
    the ceiling (`report.ceiling_limited`; the clip is then quieter than the target). One gain for the whole clip and
    all its channels: no compression, the waveform and the balance of the channels are kept.

    Edge cases:
    - silence (digital zeros, or a loudness below the -70 LUFS gate, such as a noise floor): returned unchanged
      (`report.silent`), never amplified, no division by zero; only a clip whose true peak is above the ceiling
      anyway (a DC offset, which K-weighting does not hear) is scaled down to the ceiling;
    - a clip shorter than the 400-ms gating block (pyloudnorm refuses those): measured as one block of its own length
      through the same K-weighting and channel weights (its ungated K-weighted RMS, `report.method == "short"`), then
      normalised like any other; for a steady sound this matches the integrated loudness of a longer take;
    - no samples: returned unchanged (`report.method == "none"`);
    - NaN or inf samples, more than 5 channels, another shape: AudioError naming the fix.
    """
    what = "loudness_normalize"
    sample_rate = check_sample_rate(sample_rate, what)
    target_lufs = _check_db("target_lufs", target_lufs, LOUDNESS_GATE_LUFS, 0.0)
    peak_ceiling_db = _check_db("peak_ceiling_db", peak_ceiling_db, -60.0, 0.0)
    x = _samples64(audio, what)
    if x.size == 0:
        return audio, LoudnessReport(-math.inf, 0.0, -math.inf, False, -math.inf, "none", True)
    if x.shape[0] > 5:
        raise AudioError(
            f"{what}: audio has {x.shape[0]} channels; BS.1770 loudness is defined for up to 5 (L, R, C, Ls, Rs): "
            "mix it down, or write it with normalize=None"
        )
    measured, method = _measure_lufs(x, sample_rate)
    if math.isnan(measured):  # defensive: pyloudnorm gives -inf for a clip with no block above its gates
        measured = -math.inf
    peak = _true_peak(x, TRUE_PEAK_OVERSAMPLE)
    ceiling = 10.0 ** (peak_ceiling_db / 20.0)
    if not math.isfinite(measured) or measured < LOUDNESS_GATE_LUFS:
        gain = ceiling / peak if peak > ceiling else 1.0  # silent: never up; down only past the ceiling
        out_db = _db(peak * gain)
        report = LoudnessReport(measured, _db(gain), out_db, gain != 1.0, measured + _db(gain), method, True)
        return _with_gain(audio, gain), report
    gain_db = target_lufs - measured
    limited = _db(peak) + gain_db > peak_ceiling_db
    gain = ceiling / peak if limited else 10.0 ** (gain_db / 20.0)
    gain_db = _db(gain)
    report = LoudnessReport(measured, gain_db, _db(peak * gain), limited, measured + gain_db, method, False)
    return _with_gain(audio, gain), report


_NORMALIZE_MODES = ("loudness", "peak", None)


def write_wav(
    path: str | os.PathLike,
    audio: torch.Tensor,
    sample_rate: int,
    *,
    normalize: str | None = "loudness",
    target_lufs: float = TARGET_LUFS,
    peak_ceiling_db: float = PEAK_CEILING_DB,
) -> str:
    """Write `audio` (`[C, T]`, `[T]`, or `[1, C, T]`; float or integer PCM) as 16-bit PCM WAV, atomically, at a
    listening level chosen by `normalize`:

    - "loudness" (the default): `loudness_normalize` to `target_lufs` (-14 LUFS, the streaming platforms' reference
      level) with the true peak at most `peak_ceiling_db` (-1 dBTP), so nothing clips: raw model output (which
      `ppt_fast.generate()` returns as is, peaks of 10 included) is written at a level to listen to. Silence is written
      as it is; a clip under 400 ms is measured by its K-weighted RMS (`loudness_normalize`). What was done is logged
      at INFO; call `loudness_normalize` yourself for the report, then write with normalize=None.
    - "peak": only a clip peaking above 0.99 is scaled down to peak 0.99 (`fit_peak`), never up; the level otherwise
      stays as given.
    - None (or False): the samples as given, e.g. a reference clip or a bit-exact copy: samples above full scale are
      clipped to [-1, 1] with a warning naming `fit_peak`; integer PCM is written through sample for sample.

    One gain per call: clips to be compared at their relative levels are scaled together first (`fit_peak` on all of
    them, or one `loudness_normalize` gain), then written with normalize=None.

    The file appears complete or not at all (`ppt_fast._io.atomic_write`: a temporary file in the same folder, then
    renamed); a path that is no regular file (a directory, a device such as /dev/null) raises UnwritablePathError.
    Integer samples are taken by their range (`to_float`). Returns the path written.
    """
    import soundfile as sf

    path = os.fspath(path)
    if normalize is False:
        normalize = None
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"write_wav: normalize must be 'loudness', 'peak' or None, got {normalize!r}")
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
    if normalize == "loudness":
        a, report = loudness_normalize(a, sample_rate, target_lufs=target_lufs, peak_ceiling_db=peak_ceiling_db)
        logger.info("write_wav %s: %s", path, report)
        a = a.clamp(-1, 1)  # the ceiling (<= 0 dBTP) keeps every sample inside: this only absorbs float rounding
    elif normalize == "peak":
        (a,), gain = fit_peak(a)
        if gain != 1.0:
            logger.info("write_wav %s: peak %.2f scaled by %.4f to 0.99", path, 0.99 / gain, gain)
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
