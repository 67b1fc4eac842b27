"""`generate()`: text-to-music with concepts applied, on a base model, seeded.

Every argument is checked before the model is loaded (`check_generate_args`), and the output's size against the
memory available before anything is sampled: a bad one raises GenerateError naming it and the fix. Concept files are
read and checked before the model is loaded too; one without a fingerprint of its base model is applied only with
`allow_unverified=True`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .audio import SILENCE_RMS, silent_stretches
from .hosts.base import Host
from .models import load_host

logger = logging.getLogger(__name__)

#: Longest clip generate() makes (10 minutes). MusicGen extends past its 30-s window chunk by chunk (memory stays
#: bounded, time grows linearly): unbounded, a slip of the keyboard (1e6 s: 64 GB of 16-kHz audio) runs for ever.
MAX_DURATION = 600.0
#: Most times a silent clip is sampled again: a model that only makes silence must not loop for ever.
MAX_RESAMPLE = 10
#: Largest classifier-free guidance coefficient: MusicGen uses 3; far beyond it the guided logits overflow.
MAX_CFG_COEF = 100.0
#: Smallest positive temperature: 0 is greedy decoding; logits / 1e-40 overflow to inf and sampling fails.
MIN_TEMPERATURE = 1e-3


class GenerateError(ValueError):
    """Bad input to generate(), raised before the model is loaded or sampled; the message names the fix."""


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_generate_args(
    prompts: Any,
    *,
    duration: Any = 5.0,
    seed: Any = None,
    cfg_coef: Any = None,
    top_k: Any = None,
    top_p: Any = None,
    temperature: Any = None,
    scale: Any = 1.0,
    resample_silent: Any = 0,
) -> list[str]:
    """Check generate()'s arguments without touching a model; return the prompts as a list. GenerateError names the
    first bad one: prompts must be one non-empty string or a non-empty list of them; duration finite, > 0 and <=
    MAX_DURATION seconds; seed None or a whole number in [0, 2**63); cfg_coef in [0, MAX_CFG_COEF]; top_k a whole
    number >= 0 (0: no top-k); top_p in [0, 1] (0: off, top-k is used); temperature 0 (greedy) or in
    [MIN_TEMPERATURE, inf); scale finite with |scale| <= ppt_fast.concept.MAX_SCALE; resample_silent a whole number in
    [0, MAX_RESAMPLE]. None takes the model's own setting (see `generate`)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, (Sequence, set, frozenset)):
        raise GenerateError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise GenerateError("prompts is empty; give at least one prompt, e.g. 'a piece of music, <v1>'")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise GenerateError(f"prompt {i} is a {type(p).__name__}, not a string: {p!r}")
        if not p.strip():
            raise GenerateError(f"prompt {i} is empty; describe the music, e.g. 'a piece of music, <v1>'")
    if not _real(duration) or not 0 < duration <= MAX_DURATION:
        raise GenerateError(
            f"duration={duration!r} must be a number of seconds in (0, {MAX_DURATION:g}] (the longest clip "
            f"generate() makes is {MAX_DURATION / 60:g} minutes; join several for more)"
        )
    if seed is not None and (not _whole(seed) or not 0 <= seed < 2**63):
        raise GenerateError(f"seed={seed!r} must be None or a whole number in [0, 2**63)")
    if cfg_coef is not None and (not _real(cfg_coef) or not 0 <= cfg_coef <= MAX_CFG_COEF):
        raise GenerateError(
            f"cfg_coef={cfg_coef!r} must be a number in [0, {MAX_CFG_COEF:g}] (classifier-free guidance: 1 follows the "
            "prompt as trained, MusicGen uses 3; None: the model's own)"
        )
    if top_k is not None and (not _whole(top_k) or top_k < 0):
        raise GenerateError(f"top_k={top_k!r} must be a whole number >= 0 (0: sample from every code; None: the "
                            "model's own, 250 for MusicGen)")  # fmt: skip
    if top_p is not None and (not _real(top_p) or not 0 <= top_p <= 1):
        raise GenerateError(f"top_p={top_p!r} must be a number in [0, 1] (nucleus sampling; 0: off, top_k is used)")
    if temperature is not None and (not _real(temperature) or not (temperature == 0 or temperature >= MIN_TEMPERATURE)):
        raise GenerateError(
            f"temperature={temperature!r} must be 0 (greedy decoding) or a finite number >= {MIN_TEMPERATURE:g} "
            "(1: the model's distribution; None: the model's own)"
        )
    from .concept import MAX_SCALE

    if not _real(scale) or abs(scale) > MAX_SCALE:
        raise GenerateError(
            f"scale={scale!r} must be a finite number in [-{MAX_SCALE:g}, {MAX_SCALE:g}] (the concepts' strength: "
            "1 = as tuned, 0 = the base model)"
        )
    if not _whole(resample_silent) or not 0 <= resample_silent <= MAX_RESAMPLE:
        raise GenerateError(
            f"resample_silent={resample_silent!r} must be a whole number in [0, {MAX_RESAMPLE}] (how many times to "
            "re-sample a silent clip; 0: only log it)"
        )
    return prompts


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_model_bounds(host: Host, n_clips: int, duration: float) -> None:
    """GenerateError when `duration` is shorter than one of the model's frames or the clips would not fit in memory
    (float32 audio, counted twice: the decoder's output and the CPU copy returned)."""
    frame_rate = host.frame_rate
    if frame_rate and duration * frame_rate < 1:
        raise GenerateError(f"duration={duration!r} s is shorter than one frame of this model (1/{frame_rate:g} s)")
    need = 2 * 4 * n_clips * host.channels * host.sample_rate * duration
    have = _available_memory()
    if have is not None and need > have:
        raise GenerateError(
            f"{n_clips} clip(s) of {duration:g} s would take about {need / 2**30:.1f} GiB of memory for the audio "
            f"alone; {have / 2**30:.1f} GiB is available: generate fewer or shorter clips at a time"
        )


def _as_concepts(concepts: Any) -> list[Any]:
    if concepts is None:
        return []
    if isinstance(concepts, (str, bytes)) or hasattr(concepts, "apply"):
        concepts = [concepts]
    out = []
    for c in concepts:
        if hasattr(c, "apply"):
            out.append(c)
        else:
            from .concept import Concept

            out.append(Concept.load(c))
    return out


def generate(
    prompts: str | Sequence[str],
    *,
    model: Any = "tiny",
    concepts: Any = (),
    duration: float = 5.0,
    seed: int | None = None,
    cfg_coef: float | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    scale: float = 1.0,
    device: str | torch.device | None = None,
    progress: bool = False,
    resample_silent: int = 0,
    allow_unverified: bool = False,
) -> torch.Tensor:
    """Generate music for `prompts` with `concepts` applied; returns float32 `[B, C, T]` at `model.sample_rate`.

    Args:
        prompts: one prompt or a list; prompts may name identifiers anywhere ("<v1>, <v2>, electronic dance music").
        model: a `load_model` name/path/id or a MusicGen object. Concepts are applied for this call and removed
            afterwards, so a model object is left as it was.
        concepts: Concept objects or concept file paths (composed in the order given; composition is
            order-independent, see ppt_fast.concept).
        duration: seconds of audio, at most MAX_DURATION (10 minutes); seed: sampling seed (None: not reseeded);
            cfg_coef, top_k, temperature, top_p: MusicGen's sampling settings (top_k is capped at the model's codebook
            size; top_p > 0 samples from the nucleus instead of the top k); None takes the model's own (MusicGen's:
            3.0, 250, 1.0, 0; the trained default `tiny`: 1.0, 64, 0.85, what its figures were measured with). Every
            argument is checked before the model is loaded (`check_generate_args`; GenerateError).
        scale: strength of every concept's parameter change (1.0 = as tuned).
        resample_silent: generate a clip again, up to this many times (sampling seed `seed + 1`, `seed + 2`, ...;
            unseeded when `seed` is None; the same concepts applied), while it is silent throughout or holds a silent
            stretch of SILENT_STRETCH_SECONDS (1 s) or longer (RMS below -80 dBFS over consecutive half-second
            windows, `ppt_fast.audio.silent_stretches`). A small LM can fall into its codec's silence code and stay
            there (docs/default_model.md, "Silence"). 0 (the default, and what the figures are measured with, so
            that they count it) logs each such clip, naming the stretches; `ppt-fast generate` uses 2.
        allow_unverified: apply concepts that hold no fingerprint of their base model for some tensor they change
            (`Concept.unverified_names()`; a file captured without `base=`, or one whose fingerprint was removed).
            Nothing then checks that they were tuned on `model` (only the names and shapes of what they change).
            False (the default): such a concept raises ConceptError before the model is loaded.
    """
    prompts = check_generate_args(
        prompts, duration=duration, seed=seed, cfg_coef=cfg_coef, top_k=top_k, top_p=top_p, temperature=temperature,
        scale=scale, resample_silent=resample_silent,
    )  # fmt: skip
    cs = _as_concepts(concepts)  # files read and checked before the model loads
    if not allow_unverified:
        from .concept import _check_verified

        for c in cs:
            if hasattr(c, "unverified_names"):
                _check_verified(c)
    host = load_host(model, device=device)
    _check_model_bounds(host, len(prompts), float(duration))
    host.set_sampling(duration, cfg_coef=cfg_coef, top_k=top_k, temperature=temperature, top_p=top_p)
    applied = []
    try:
        for c in cs:
            c.apply(host.model, scale=scale, allow_unverified=allow_unverified)
            applied.append(c)
        known = host.identifier_bank().identifiers()
        for p in prompts:
            for word in p.replace(",", " ").split():
                if word.startswith("<") and word.endswith(">") and word not in known:
                    logger.warning("prompt %r names %s but no applied concept defines it", p, word)
        audio = _sample(host, prompts, seed, progress)
        for attempt in range(1, resample_silent + 1):
            silent = sorted(_silent(audio, host.sample_rate))
            if not silent:
                break
            logger.info("re-sampling %d clip(s) with silence (attempt %d of %d)", len(silent), attempt, resample_silent)
            again = _sample(host, [prompts[i] for i in silent], None if seed is None else seed + attempt, progress)
            audio[silent] = again
    finally:
        for c in reversed(applied):
            c.remove(host.model)
    _warn_silent(audio, host.sample_rate, prompts, resample_silent)
    return audio


def _sample(host: Host, prompts: list[str], seed: int | None, progress: bool) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
    return host.generate(prompts, progress=progress)


def _rms(audio: torch.Tensor) -> torch.Tensor:
    return audio.pow(2).mean(dim=tuple(range(1, audio.dim()))).sqrt()


def _silent(audio: torch.Tensor, sample_rate: int) -> dict[int, str]:
    """The clips that are silent throughout (RMS below -80 dBFS) or hold a silent stretch of SILENT_STRETCH_SECONDS
    or longer, each with what was found ("silent throughout", "silent 0.0-2.0 s, 3.0-4.0 s")."""
    rms = _rms(audio)
    found: dict[int, str] = {}
    for i, runs in enumerate(silent_stretches(audio, sample_rate)):
        if float(rms[i]) < SILENCE_RMS:
            found[i] = f"silent throughout (RMS {float(rms[i]):.1e})"
        elif runs:
            found[i] = "silent " + ", ".join(f"{a:.1f}-{b:.1f} s" for a, b in runs)
    return found


def _warn_silent(audio: torch.Tensor, sample_rate: int, prompts: Sequence[str], resampled: int = 0) -> None:
    """Log the clips that came out silent, throughout or for a stretch (`_silent`): a small LM can fall into its
    codec's silence code and stay there for a while, and a silent file or gap is otherwise easy to miss."""
    fix = (f"still there after {resampled} re-sample(s); generate it again with another seed" if resampled else
           "generate it again with another seed, or pass resample_silent=2 (ppt-fast generate does)")  # fmt: skip
    for i, what in sorted(_silent(audio, sample_rate).items()):
        logger.warning("clip %d (prompt %r) came out %s: the model fell into silence on this sample; %s",
                       i, prompts[i], what, fix)  # fmt: skip
