"""Reference audio -> checked, resampled, segmented, encoded (once, cached) training codes; host-agnostic.

`encode_reference(model, ...)` and `encode_mix(model, ...)` take any object with `sample_rate`, `audio_channels` and a
`compression_model` whose `encode(audio [B, C, T])` returns `(codes [B, K, F], scale)` and which states its
`frame_rate`, `num_codebooks` and `cardinality` (an audiocraft MusicGen is one; the transformers host adapts its
EnCodec to it).

A reference may be a path (anything soundfile reads; any sample rate and channel count) or a `(tensor [C, T],
sample_rate)` pair. It is resampled (julius) and mixed to the model's format, checked, cut into overlapping
segments, encoded by the model's compression model, and the codes are cached under
`$PPT_FAST_CACHE/encoded/<key>.pt` with key = sha256(file bytes or samples, compression-model fingerprint,
segment settings).

Checks, all before any encoding (`load_reference`, `check_audio`): a sample rate that is a whole number of Hz > 0;
`[C, T]`, `[T]` or a batch of one `[1, C, T]` (no more channels than samples: that is `[T, C]`); integer samples
rescaled by their range; finite samples; between MIN_SECONDS and MAX_SECONDS long; not silent once its DC offset is
removed. A reference peaking above full scale (float files can) is scaled down to peak 1.0, with a logged warning:
its waveform is kept, only its level changes, and a codec trained on [-1, 1] audio sees audio in that range. Cached
codes are checked against the codec (shape, integer dtype, codes below its cardinality) and re-encoded, with a
warning, when they do not fit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import _env
from ._io import atomic_write
from .audio import SILENCE_RMS, AudioError, check_sample_rate, fit_peak, read_audio, to_float, to_model_format

logger = logging.getLogger(__name__)

MIN_SECONDS = 1.0  # shortest usable reference
#: Longest reference accepted (an hour): the codes of all its segments are computed and held at once, and minutes
#: are what tuning needs (about 2 minutes works best).
MAX_SECONDS = 3600.0


@dataclass
class EncodedReference:
    """Training codes of one reference: `codes` int64 `[N, K, F]` (N segments, K codebooks, F frames)."""

    codes: torch.Tensor
    source: str
    seconds: float
    cache_path: str | None


def load_reference(reference, sample_rate: int, channels: int) -> tuple[torch.Tensor, bytes, str]:
    """Read and check a reference; return (float32 `[channels, T]` at `sample_rate`, bytes for the cache key, name).

    `reference`: a path, or a `(samples, sample_rate)` pair with samples a tensor or numpy array of shape `[C, T]`,
    `[T]` or `[1, C, T]` (float in [-1, 1], or integer PCM, rescaled by its range). Raises AudioError for anything
    `check_audio` refuses; audio peaking above 1.0 is scaled down to peak 1.0 with a warning (module docstring)."""
    if isinstance(reference, (str, os.PathLike)):
        path = os.fspath(reference)
        audio, sr = read_audio(path, max_seconds=MAX_SECONDS)
        with open(path, "rb") as f:
            key = hashlib.sha256(f.read()).digest()
        name = path
    elif isinstance(reference, tuple) and len(reference) == 2 and isinstance(reference[0], (torch.Tensor, np.ndarray)):
        samples, sr = reference
        shape = tuple(samples.shape)
        name = f"<tensor {shape} @ {sr} Hz>"
        sr = check_sample_rate(sr, f"reference {name}")
        audio = to_float(samples, f"reference {name}")
        if audio.dim() == 3 and audio.shape[0] == 1:
            audio = audio[0]
        if audio.dim() == 1:
            audio = audio[None]
        if audio.dim() != 2:
            raise AudioError(
                f"reference {name}: samples must be [channels, samples], [samples] or a batch of one [1, channels, "
                f"samples]; got {audio.dim()} dimensions"
            )
        if audio.numel() and audio.shape[0] > audio.shape[1]:
            raise AudioError(
                f"reference {name} has more channels ({audio.shape[0]}) than samples ({audio.shape[1]}): it looks "
                "like [samples, channels]; pass samples.T"
            )
        key = hashlib.sha256(audio.contiguous().numpy().tobytes() + str(sr).encode()).digest()
    else:
        raise AudioError(
            f"reference must be a path to an audio file or a (tensor [C, T], sample_rate) pair, got "
            f"{type(reference).__name__}"
        )
    check_audio(audio, sr, name)
    peak = float(audio.abs().max())
    if peak > 1.0:
        (audio,), gain = fit_peak(audio, limit=1.0)
        logger.warning("reference %s peaks at %.2f, above full scale (1.0): scaled by %.4f to peak 1.0", name, peak,
                       gain)  # fmt: skip
    return to_model_format(audio, sr, sample_rate, channels), key, name


def check_audio(
    audio: torch.Tensor, sample_rate: int, name: str, min_seconds: float = MIN_SECONDS, max_seconds: float = MAX_SECONDS
) -> None:
    """Raise AudioError for a shape other than `[C, T]` with samples, a bad sample rate, NaN/inf samples, silence
    (RMS below SILENCE_RMS after removing each channel's mean: a DC-only clip is silent), or a clip shorter than
    `min_seconds` or longer than `max_seconds`."""
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise AudioError(f"reference {name}: samples must be [channels, samples], got shape {shape}")
    if audio.shape[0] == 0 or audio.shape[-1] == 0:
        raise AudioError(f"reference {name} holds no samples (shape {tuple(audio.shape)})")
    sample_rate = check_sample_rate(sample_rate, f"reference {name}")
    if not torch.isfinite(audio).all():
        bad = int((~torch.isfinite(audio)).sum())
        raise AudioError(f"reference {name} has {bad} NaN/inf samples; re-export it from your audio editor")
    seconds = audio.shape[-1] / sample_rate
    if seconds < min_seconds:
        raise AudioError(
            f"reference {name} is {seconds:.2f} s long; the minimum is {min_seconds:g} s (about 2 minutes works best)"
        )
    if seconds > max_seconds:
        raise AudioError(
            f"reference {name} is {seconds:.0f} s long; the maximum is {max_seconds:g} s: cut out the part to learn "
            "(about 2 minutes works best)"
        )
    a = audio.double()
    rms = float((a - a.mean(-1, keepdim=True)).pow(2).mean().sqrt())
    if rms < SILENCE_RMS:
        dc = float(a.mean(-1).abs().max())
        what = f" apart from a DC offset of {dc:.2e}" if dc >= SILENCE_RMS else ""
        raise AudioError(
            f"reference {name} is silent{what} (RMS {rms:.2e} < {SILENCE_RMS:g} after removing the mean); check the "
            "file and its gain"
        )


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
    model, reference, *, segment_seconds: float, codec_fingerprint: str, use_cache: bool = True, batch: int = 8,
    progress: bool = False,
) -> EncodedReference:
    """Load, check, segment and encode `reference` with `model.compression_model`; cache the codes.

    `progress`: a bar over the segments (count, rate, ETA); when the codes are cached its last line says so, since
    the next run with the same reference, codec and segment length skips this step."""
    audio, key_bytes, name = load_reference(reference, model.sample_rate, model.audio_channels)
    h = hashlib.sha256()
    h.update(key_bytes)
    h.update(codec_fingerprint.encode())
    h.update(f"{model.sample_rate}|{model.audio_channels}|{segment_seconds:.6f}|v1".encode())
    key = h.hexdigest()
    cache_path = os.path.join(_env.cache_dir(), "encoded", f"{key}.pt") if use_cache else None
    seconds = audio.shape[-1] / model.sample_rate
    segs = segments(audio, model.sample_rate, segment_seconds)
    if cache_path and os.path.isfile(cache_path):
        try:
            codes = torch.load(cache_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: re-encode
            logger.warning("ignoring unreadable cache file %s (%s); re-encoding", cache_path, e)
        else:
            problem = _check_codes(codes, model.compression_model, segs.shape[0], segs.shape[-1], model.sample_rate)
            if problem is None:
                logger.info("reference %s: codes from cache %s", name, cache_path)
                return EncodedReference(codes, name, seconds, cache_path)
            logger.warning("ignoring cache file %s: %s; re-encoding", cache_path, problem)
    from tqdm.auto import tqdm

    device = module_device(model.compression_model)
    parts = []
    bar = tqdm(total=segs.shape[0], desc=f"encoding reference ({seconds:.0f} s)", unit="segment", leave=True,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    with torch.no_grad():
        for i in range(0, segs.shape[0], batch):
            codes, _scale = model.compression_model.encode(segs[i : i + batch].to(device))
            parts.append(codes.cpu().long())
            bar.update(min(batch, segs.shape[0] - i))
    codes = torch.cat(parts)
    if cache_path:
        try:
            atomic_write(cache_path, lambda tmp: torch.save(codes, tmp))
            bar.set_postfix_str("cached: the next run with this reference skips this step")
        except OSError as e:  # the codes are in hand: an unwritable cache costs the next run an encode, not this one
            logger.warning("cannot write the codes cache %s (%s); continuing without it (set PPT_FAST_CACHE to a "
                           "writable folder)", cache_path, e)  # fmt: skip
    bar.close()
    logger.info("reference %s: %.1f s -> %d segments of codes %s", name, seconds, codes.shape[0], tuple(codes.shape))
    return EncodedReference(codes, name, seconds, cache_path)


def _check_codes(codes, codec, n_segments: int, segment_samples: int, sample_rate: int) -> str | None:
    """What is wrong with cached `codes` for this codec and these segments (None: nothing): an int64 tensor
    `[n_segments, codec.num_codebooks, frames]`, frames within one of `segment_samples * frame_rate / sample_rate`
    (codecs round the last frame either way), every code in `[0, codec.cardinality)`."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int64:
        return f"holds {getattr(codes, 'dtype', type(codes).__name__)}, not int64 codes"
    frames = segment_samples * float(codec.frame_rate) / sample_rate
    want = (n_segments, int(codec.num_codebooks))
    if codes.dim() != 3 or tuple(codes.shape[:2]) != want or abs(codes.shape[2] - frames) > 1:
        return f"shape {tuple(codes.shape)}, expected [{want[0]}, {want[1]}, ~{math.ceil(frames)}]"
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= int(codec.cardinality)):
        return f"codes in [{int(codes.min())}, {int(codes.max())}], outside the codebook's [0, {codec.cardinality})"
    return None


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module lives (its first parameter or buffer; CPU for an empty one). Codecs may hold buffers only."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def encode_mix(model, references, segment_seconds: float, g: torch.Generator) -> torch.Tensor:
    """Codes `[N, K, F]` of mixes of one random segment of each reference (N = the fewest segments of any, at least
    2): the targets for prompts that name several concepts."""
    auds = []
    for ref in references:
        audio, _, _ = load_reference(ref, model.sample_rate, model.audio_channels)
        auds.append(segments(audio, model.sample_rate, segment_seconds))
    n = min(a.shape[0] for a in auds)
    size = min(a.shape[-1] for a in auds)
    mixes = []
    for _ in range(max(n, 2)):
        picks = [a[int(torch.randint(0, a.shape[0], (1,), generator=g))][..., :size] for a in auds]
        mixes.append(sum(picks) / len(picks))
    codec = model.compression_model
    with torch.no_grad():
        codes, _ = codec.encode(torch.stack(mixes).to(module_device(codec)))
    return codes.long()
