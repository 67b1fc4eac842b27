"""The four concept metrics: audio alignment, text alignment, diversity, copying.

All take float audio ``[C, T]`` or ``[B, C, T]`` (tensor or array) at `sample_rate` Hz and resample inside (to the
embedders' 16 kHz). Clips are mixed to mono. Handling of awkward input, the same everywhere:

- a clip shorter than one 3-s window raises ``ValueError`` (``pad='repeat'`` tiles it instead, as musicnn's own
  training did);
- silent segments (RMS < -80 dBFS) of a generated clip are left out of its mean; a generated clip that is silent
  throughout scores 0 alignment (and a warning is logged); a silent *reference* raises;
- a reference at another rate than the clips: pass ``reference_sample_rate``; both are resampled to 16 kHz.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import features, musicnn

log = logging.getLogger(__name__)


def _mono_clips(audio, sample_rate, name: str) -> list[torch.Tensor]:
    return features.to_mono_16k(features.as_batch(audio, name), features.check_rate(sample_rate, f"{name} sample_rate"))


def _reference_centroid(reference, rate: int, embedder: features.Embedder, pad: str) -> torch.Tensor:
    ref = features.as_batch(reference, "reference")
    if ref.shape[0] != 1:
        raise ValueError(f"reference must be one clip [C, T], got {tuple(ref.shape)}")
    ((emb, silent),) = features.embed_clips(features.to_mono_16k(ref, rate), embedder, pad=pad, name="reference")
    if silent.all():
        raise ValueError("reference is silent (RMS < -80 dBFS in every 3-s window): pass the concept's recording")
    return F.normalize(emb[~silent].mean(0), dim=0)


def audio_alignment(
    audio,
    reference,
    sample_rate: int,
    *,
    reference_sample_rate: int | None = None,
    embedder: str = "musicnn",
    pad: str = "error",
) -> float:
    """Audio Alignment Score: how much generated clips sound like the reference concept.

    Cosine similarity between each non-silent 3-s segment's embedding of each generated clip and the reference's
    centroid embedding (the normalised mean of its segments' embeddings), averaged over a clip's segments and then
    over clips. ``embedder``: ``'musicnn'`` (200-d MTT penultimate layer; default) or ``'mfcc'`` (weight-free).

    Args:
        audio: ``[C, T]`` or ``[B, C, T]`` float at `sample_rate`.
        reference: ``[C, T]`` float at `reference_sample_rate` (default `sample_rate`).
    Returns: a float in [-1, 1] (higher = closer to the concept).
    """
    emb = features.get_embedder(embedder)
    ref_rate = features.check_rate(reference_sample_rate or sample_rate, "reference_sample_rate")
    centroid = _reference_centroid(reference, ref_rate, emb, pad)
    scores = []
    for i, (seg, silent) in enumerate(features.embed_clips(_mono_clips(audio, sample_rate, "audio"), emb, pad=pad)):
        if silent.all():
            log.warning("audio_alignment: clip %d is silent; it scores 0", i)
            scores.append(0.0)
            continue
        scores.append(F.cosine_similarity(seg[~silent], centroid[None], dim=1).mean().item())
    return float(sum(scores) / len(scores))


def clip_embeddings(clips, sample_rate: int, *, embedder: str = "musicnn", pad: str = "error") -> torch.Tensor:
    """One unit-norm embedding per clip (normalised mean of its non-silent segments; zeros if silent): ``[B, D]``."""
    emb = features.get_embedder(embedder)
    out = []
    for seg, silent in features.embed_clips(_mono_clips(clips, sample_rate, "clips"), emb, pad=pad, name="clips"):
        out.append(F.normalize(seg[~silent].mean(0), dim=0) if not silent.all() else torch.zeros(emb.dim))
    return torch.stack(out)


def diversity(clips, sample_rate: int, *, embedder: str = "musicnn", pad: str = "error") -> float:
    """Mean pairwise cosine distance ``1 - cos`` between the clip embeddings of clips generated for one prompt.

    ``clips``: ``[B, C, T]`` with B >= 2. 0 = all clips sound the same; larger = more varied (musicnn distances
    between different instruments are ≈ 0.5, between compositions of one instrument ≈ 0.02-0.1). Silent clips embed
    as zeros (distance 1 to everything): check audio_alignment's warnings.
    """
    emb = clip_embeddings(clips, sample_rate, embedder=embedder, pad=pad)
    if emb.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 clips for one prompt, got {emb.shape[0]}")
    sim = emb @ emb.T
    iu = torch.triu_indices(emb.shape[0], emb.shape[0], offset=1)
    return float((1.0 - sim[iu[0], iu[1]]).mean())


# --------------------------------------------------------------------------------------------------------------------
# Copying: verbatim reuse of the reference.
# --------------------------------------------------------------------------------------------------------------------


# The reference is analysed with a 4x finer hop than the generated windows, and the windows slide over it with
# dilation 4: a copy that starts at an arbitrary sample is then matched within 2 ms instead of 8 ms (sharp drum hits
# otherwise lose ~0.1 of correlation to the frame phase).
_REF_HOP_DIV = 4


# Log-mel floor relative to the clip's loudest mel bin (-30 dB): quiet bands, where added noise or a different noise
# floor would otherwise dominate the band-centred pattern, count as flat; and a gain change only shifts the log,
# which the per-band centring removes (measured: 24-dB-SNR noise on a violin copy 0.78 -> 0.98 with this floor).
_COPY_FLOOR = 1e-3


def _copy_features(mono: torch.Tensor, hop: int = musicnn.HOP) -> torch.Tensor:
    power = musicnn.mel_power(mono, hop=hop).to(torch.float64)
    return torch.log10(power + _COPY_FLOOR * power.max().clamp_min(1e-20)).T  # [96, frames]


def copying(
    clips,
    reference,
    sample_rate: int,
    *,
    reference_sample_rate: int | None = None,
    window_seconds: float = 2.0,
    hop_seconds: float = 1.0,
) -> float:
    """Copying score: how close generated clips come to *verbatim* segments of the reference (overfitting detector).

    Each generated clip is cut into `window_seconds` log-mel windows (hop `hop_seconds`); each window is slid over
    the whole reference log-mel and its best normalised cross-correlation is kept, with every
    mel band centred over the window's time axis first (the reference is analysed at a 4x finer hop, so offsets
    are tried every 4 ms), so that only the time-frequency *pattern* (which notes,
    when) counts, not the static spectral envelope that any clip of the same instrument shares. Result: mean over
    windows and clips, in [-1, 1].

    Why this and not embedding similarity: the concept embedding is *meant* to be close for new compositions of the
    same concept (musicnn cosine 0.9+), so it cannot tell a new piece from a copied one; a verbatim excerpt of the
    reference scores ≈ 0.95-1.0 here even at an arbitrary sample offset, gain change or added noise, while new
    compositions of the same concept score 0.1-0.6 (see tests/test_eval_metrics.py and docs/evaluation.md).
    Silent or static windows (zero variance) are skipped; a clip with none left scores 0.
    """
    ref_rate = features.check_rate(reference_sample_rate or sample_rate, "reference_sample_rate")
    ref_b = features.as_batch(reference, "reference")
    if ref_b.shape[0] != 1:
        raise ValueError(f"reference must be one clip [C, T], got {tuple(ref_b.shape)}")
    d = _REF_HOP_DIV
    ref = _copy_features(features.to_mono_16k(ref_b, ref_rate)[0], musicnn.HOP // d)  # [F, N] at a 4x finer hop
    frames_per_s = musicnn.SAMPLE_RATE / musicnn.HOP
    length = max(2, round(window_seconds * frames_per_s))
    hop = max(1, round(hop_seconds * frames_per_s))
    span = d * (length - 1) + 1  # reference frames one dilated window covers
    if ref.shape[1] < span:
        raise ValueError(f"reference is shorter than window_seconds={window_seconds}; pass a longer reference")
    # Per-offset sums over the dilated window (frames t, t+d, ..., t+d(L-1)) of the reference and its square, from
    # float64 prefix sums taken along each of the d phases: the band-centred energy under each window position.
    n_off = ref.shape[1] - span + 1

    def window_sums(x: torch.Tensor) -> torch.Tensor:
        pad_to = -(-x.shape[1] // d) * d
        c = F.pad(x, (0, pad_to - x.shape[1])).view(x.shape[0], -1, d).cumsum(1).view(x.shape[0], -1)
        c = F.pad(c, (d, 0))
        return c[:, d * length : d * length + n_off] - c[:, :n_off]

    ref_energy = (window_sums(ref.square()) - window_sums(ref).square() / length).sum(0).clamp_min(0)
    ref32 = ref.to(torch.float32)
    scores = []
    for mono in _mono_clips(clips, sample_rate, "clips"):
        gen = _copy_features(mono)[:, 2:-2]  # drop the frames that see the STFT padding at the clip edges
        if gen.shape[1] < length:
            raise ValueError(
                f"a clip is {mono.shape[-1] / musicnn.SAMPLE_RATE:.2f} s long; window_seconds={window_seconds} needs "
                f">= {(length + 4) * musicnn.HOP / musicnn.SAMPLE_RATE:.2f} s: lower window_seconds or generate longer"
            )
        starts = range(0, gen.shape[1] - length + 1, hop)
        windows = torch.stack([gen[:, s : s + length] for s in starts])  # [W, F, L]
        windows = windows - windows.mean(2, keepdim=True)
        norms = windows.flatten(1).norm(dim=1)
        keep = norms > 1e-6 * math.sqrt(windows[0].numel())
        if not keep.any():
            scores.append(0.0)
            continue
        windows, norms = windows[keep], norms[keep]
        # [W, n_off] in float32 (the costly part); centred windows cancel the reference's means
        num = F.conv1d(ref32[None], windows.to(torch.float32), dilation=d)[0].to(torch.float64)
        ncc = num / (norms[:, None] * ref_energy.sqrt()[None].clamp_min(1e-12))
        ncc = torch.where(ref_energy[None] > 1e-9, ncc, torch.zeros_like(ncc))
        scores.append(ncc.amax(1).mean().item())
    return float(sum(scores) / len(scores))


# --------------------------------------------------------------------------------------------------------------------
# Text alignment.
# --------------------------------------------------------------------------------------------------------------------

TAG_PROXY = "musicnn-tag-proxy"

# Prompt words -> MTT tags, beyond exact tag words (plural/singular and near synonyms of the tag vocabulary).
_TAG_SYNONYMS = {
    "drum": "drums", "percussion": "drums", "guitars": "guitar", "pianos": "piano", "violins": "violin",
    "flutes": "flute", "synthesizer": "synth", "synths": "synth", "orchestral": "classical", "calm": "soft",
    "quick": "fast", "slowly": "slow", "edm": "electronic", "harps": "harp", "cellos": "cello", "string": "strings",
}  # fmt: skip


def prompt_tags(prompt: str) -> tuple[str, ...]:
    """The MTT tags a prompt names (multi-word tags first, so 'no vocals' does not also count as 'vocals')."""
    text = " " + " ".join(re.sub(r"[^a-z ]+", " ", prompt.lower()).split()) + " "
    found: dict[str, int] = {}  # tag -> position of its first mention
    for tag in sorted(musicnn.MTT_LABELS, key=lambda t: -len(t)):
        pos = text.find(f" {tag} ")
        if pos >= 0:
            found[tag] = pos
            text = text.replace(f" {tag} ", " " + "#" * len(tag) + " ")  # keep positions, block shorter matches
    pos = 0
    for word in text.split(" "):
        tag = _TAG_SYNONYMS.get(word)
        if tag and tag not in found:
            found[tag] = pos
        pos += len(word) + 1
    return tuple(sorted(found, key=found.__getitem__))


@dataclass(frozen=True)
class TextAlignmentScore:
    """A text-alignment value with what produced it: ``method`` is ``'clap'`` or ``'musicnn-tag-proxy'``.

    The tag proxy is NOT CLAP: it is the mean musicnn MTT probability of the tags that the prompt names (``tags``);
    ``value`` is NaN when the prompt names no MTT tag. ``float(score)`` gives ``value``.
    """

    value: float
    method: str
    tags: tuple[str, ...] = ()

    def __float__(self) -> float:
        return self.value

    @property
    def label(self) -> str:
        if self.method == "clap":
            return "text alignment (CLAP cosine)"
        return f"text alignment (musicnn tag proxy, not CLAP; tags: {', '.join(self.tags) or 'none in prompt'})"


def text_alignment(
    audio,
    prompt: str,
    sample_rate: int,
    *,
    clap_checkpoint: str | None = None,
    clap_model: str = "HTSAT-base",
    pad: str = "error",
) -> TextAlignmentScore:
    """Text Alignment Score between generated clips ``[C, T]`` / ``[B, C, T]`` and `prompt`.

    With ``clap_checkpoint`` (a local LAION-CLAP ``.pt``; needs ``pip install laion-clap``): mean CLAP cosine between
    the clips' and the prompt's embeddings. Otherwise the musicnn tag proxy (see :class:`TextAlignmentScore`),
    which every report labels as such. Pass the prompt's *text part* (without identifiers such as ``<v1>``).
    """
    if clap_checkpoint is not None:
        return TextAlignmentScore(_clap_score(audio, prompt, sample_rate, clap_checkpoint, clap_model), "clap")
    tags = prompt_tags(prompt)
    if not tags:
        return TextAlignmentScore(float("nan"), TAG_PROXY, ())
    index = torch.tensor([musicnn.MTT_LABELS.index(t) for t in tags])
    features.get_embedder("musicnn")  # raises with the install hint when the checkpoint is missing
    values = []
    for mono in _mono_clips(audio, sample_rate, "audio"):
        mono = features.fit_length(mono, pad, "audio")
        values.append(musicnn.embed_patches(mono).taggram[:, index].mean().item())
    return TextAlignmentScore(float(sum(values) / len(values)), TAG_PROXY, tags)


def _clap_score(audio, prompt: str, sample_rate: int, checkpoint: str, model: str) -> float:
    import os

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"clap_checkpoint={checkpoint!r} does not exist: pass a local LAION-CLAP .pt file")
    try:
        import laion_clap
    except ImportError as e:
        raise ModuleNotFoundError(
            "text_alignment(clap_checkpoint=...) needs `pip install laion-clap`; without it, leave clap_checkpoint "
            "unset to get the musicnn tag proxy"
        ) from e
    clap = _load_clap(laion_clap, checkpoint, model)
    x = features.as_batch(audio, "audio").mean(1)
    x = features.resample(x, features.check_rate(sample_rate), 48000)
    with torch.no_grad():
        a = torch.as_tensor(clap.get_audio_embedding_from_data(x=x.numpy(), use_tensor=False))
        t = torch.as_tensor(clap.get_text_embedding([prompt, prompt], use_tensor=False))[:1]
    return float(F.cosine_similarity(a, t, dim=1).mean())


_CLAP_CACHE: dict[tuple[str, str], object] = {}


def _load_clap(laion_clap, checkpoint: str, model: str):
    key = (checkpoint, model)
    if key not in _CLAP_CACHE:
        clap = laion_clap.CLAP_Module(enable_fusion=False, amodel=model)
        clap.load_ckpt(checkpoint)
        _CLAP_CACHE[key] = clap
    return _CLAP_CACHE[key]


# --------------------------------------------------------------------------------------------------------------------
# Embedder validation on the concept dataset.
# --------------------------------------------------------------------------------------------------------------------


def retrieval(manifest_path: str, *, embedder: str = "musicnn", concepts: Sequence[str] | None = None) -> dict:
    """Top-1 retrieval of held-out clips against the concepts' reference clips.

    For each held-out clip: audio_alignment-style cosine to every reference centroid; correct when its own
    concept's reference scores highest. Returns ``{'top1': float, 'n': int, 'same_mean': float,
    'different_mean': float, 'confusions': [(clip, true, predicted)], 'similarity': {concept: {concept: mean}}}``.
    """
    from ..synth import read_wav
    from .dataset import load_manifest

    m = load_manifest(manifest_path)
    names = list(concepts) if concepts is not None else m.concepts
    emb = features.get_embedder(embedder)
    centroids = {}
    for name in names:
        audio, sr = read_wav(m.reference_path(name))
        centroids[name] = _reference_centroid(torch.from_numpy(audio), sr, emb, "error")
    table = torch.stack([centroids[n] for n in names])  # [K, D]
    correct, total, same, diff, confusions = 0, 0, [], [], []
    sim_sum = {a: dict.fromkeys(names, 0.0) for a in names}
    counts = dict.fromkeys(names, 0)
    for true in names:
        for path in m.heldout_paths(true):
            audio, sr = read_wav(path)
            ((seg, silent),) = features.embed_clips(_mono_clips(torch.from_numpy(audio), sr, path), emb, name=path)
            sims = (F.normalize(seg[~silent], dim=1) @ table.T).mean(0)  # [K]
            pred = names[int(sims.argmax())]
            correct += pred == true
            total += 1
            counts[true] += 1
            for j, other in enumerate(names):
                sim_sum[true][other] += float(sims[j])
                (same if other == true else diff).append(float(sims[j]))
            if pred != true:
                confusions.append((path, true, pred))
    if total == 0:
        raise ValueError(f"{manifest_path} has no held-out clips: build it with heldout >= 1")
    return {
        "embedder": embedder,
        "top1": correct / total,
        "n": total,
        "same_mean": sum(same) / len(same),
        "different_mean": sum(diff) / max(1, len(diff)),
        "confusions": confusions,
        "similarity": {a: {b: sim_sum[a][b] / max(1, counts[a]) for b in names} for a in names},
    }
