"""`generate()`: text-to-music with concepts applied, on a base model, seeded."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..audio import SILENCE_RMS
from .models import load_model

logger = logging.getLogger(__name__)


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
            from ..concept import Concept

            out.append(Concept.load(c))
    return out


def set_sampling(mg, duration: float, *, cfg_coef: float | None = None, top_k: int | None = None,
                 temperature: float | None = None) -> None:  # fmt: skip
    """Set MusicGen's generation parameters; None takes the model's own recommended setting (see `generate`)."""
    own = getattr(mg, "_ppt_fast_sampling", {})  # a model's recommended settings (the trained default sets them)
    top_k = int(top_k if top_k is not None else own.get("top_k", 250))
    cfg_coef = float(cfg_coef if cfg_coef is not None else own.get("cfg_coef", 3.0))
    temperature = float(temperature if temperature is not None else own.get("temp", 1.0))
    mg.set_generation_params(
        duration=float(duration), top_k=min(top_k, mg.lm.card), cfg_coef=cfg_coef, temperature=temperature,
        extend_stride=min(18.0, mg.max_duration / 2),
    )  # fmt: skip


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
    scale: float = 1.0,
    device: str | torch.device | None = None,
    progress: bool = False,
    resample_silent: int = 0,
) -> torch.Tensor:
    """Generate music for `prompts` with `concepts` applied; returns float32 `[B, C, T]` at `model.sample_rate`.

    Args:
        prompts: one prompt or a list; prompts may name identifiers anywhere ("<v1>, <v2>, electronic dance music").
        model: a `load_model` name/path/id or a MusicGen object. Concepts are applied for this call and removed
            afterwards, so a model object is left as it was.
        concepts: Concept objects or concept file paths (composed in the order given; composition is
            order-independent, see ppt_fast.concept).
        duration: seconds of audio; seed: sampling seed (None: not reseeded); cfg_coef, top_k, temperature:
            MusicGen's sampling settings (top_k is capped at the model's codebook size); None takes the model's own
            (MusicGen's: 3.0, 250, 1.0; the trained default `tiny`: 1.0, 64, 0.7, what its figures were measured
            with).
        scale: strength of every concept's parameter change (1.0 = as tuned).
        resample_silent: generate a clip that came out silent again, up to this many times (sampling seed `seed + 1`,
            `seed + 2`, ...; unseeded when `seed` is None), with the same concepts applied. A small LM can collapse
            into silence on a sample (the trained default does on ~1-2 % of clips). 0 (the default, and what the
            figures are measured with, so that they count the collapses) only logs them; `ppt-fast generate` uses 2.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty string or list of strings")
    if not duration > 0:
        raise ValueError(f"duration={duration} must be > 0 seconds")
    if isinstance(resample_silent, bool) or not isinstance(resample_silent, int) or resample_silent < 0:
        raise ValueError(f"resample_silent={resample_silent!r} must be an int >= 0 (how many times to re-sample a "
                         "silent clip; 0: only log it)")  # fmt: skip
    mg = load_model(model, device=device)
    cs = _as_concepts(concepts)
    set_sampling(mg, duration, cfg_coef=cfg_coef, top_k=top_k, temperature=temperature)
    applied = []
    try:
        for c in cs:
            c.apply(mg, scale=scale)
            applied.append(c)
        bank = getattr(mg.lm, "_ppt_fast_identifier_bank", None)
        known = bank.identifiers() if bank is not None else []
        for p in prompts:
            for word in p.replace(",", " ").split():
                if word.startswith("<") and word.endswith(">") and word not in known:
                    logger.warning("prompt %r names %s but no applied concept defines it", p, word)
        audio = _sample(mg, prompts, seed, progress)
        for attempt in range(1, resample_silent + 1):
            silent = _silent(audio)
            if not silent:
                break
            logger.info("re-sampling %d silent clip(s) (attempt %d of %d)", len(silent), attempt, resample_silent)
            again = _sample(mg, [prompts[i] for i in silent], None if seed is None else seed + attempt, progress)
            audio[silent] = again
    finally:
        for c in reversed(applied):
            c.remove(mg)
    _warn_silent(audio, prompts, resample_silent)
    return audio


def _sample(mg, prompts: list[str], seed: int | None, progress: bool) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
    with torch.no_grad():
        return mg.generate(prompts, progress=progress).float().cpu()


def _rms(audio: torch.Tensor) -> torch.Tensor:
    return audio.pow(2).mean(dim=tuple(range(1, audio.dim()))).sqrt()


def _silent(audio: torch.Tensor) -> list[int]:
    """Indices of the clips whose RMS is below -80 dBFS throughout."""
    return torch.nonzero(_rms(audio) < SILENCE_RMS).flatten().tolist()


def _warn_silent(audio: torch.Tensor, prompts: Sequence[str], resampled: int = 0) -> None:
    """Log which clips came out silent (RMS below -80 dBFS throughout): a small LM can collapse into silence on a
    prompt (the trained default does on ~1-2 % of clips), and a silent file is otherwise easy to miss."""
    rms = _rms(audio)
    fix = (f"still silent after {resampled} re-sample(s); generate it again with another seed" if resampled else
           "generate it again with another seed, or pass resample_silent=2 (ppt-fast generate does)")  # fmt: skip
    for i in _silent(audio):
        logger.warning(
            "clip %d (prompt %r) came out silent (RMS %.1e): the model collapsed into silence on this sample; %s",
            i, prompts[i], float(rms[i]), fix,
        )  # fmt: skip
