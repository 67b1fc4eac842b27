"""The embedded default model (`model="tiny"`): its configuration, its architecture, and its weights file.

`PretrainConfig` describes a run of `ppt-fast pretrain` (`ppt_fast.tiny.pretrain`) and the model it makes: a
`MelRVQCodec` (`ppt_fast.tiny.melcodec`) and audiocraft's `LMModel` (delay pattern, cross-attention on a LUT text
conditioner with a word-hash tokenizer). `load_trained` reads a weights file (`ASSET`, the one shipped in
`ppt_fast/assets`, or one `ppt-fast pretrain --out` wrote) into an audiocraft `MusicGen` with the sampling settings
its figures were measured with; the file is checked (magic header + sha256) and refused with a fix when it is not
what the config says.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .._io import load_checked
from .melcodec import MelCodecConfig, MelRVQCodec

FORMAT = "ppt_fast.tiny_model/2"  # /2: codebooks packed as int8 + per-vector scales
#: Sampling temperature of the trained default (with top-k 64, no guidance). At 0.7 its LM falls into the codec's
#: silence code and stays there (docs/tuning.md, "Sampling of the default").
TEMPERATURE = 0.85
ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-v8.pt")

TRAIN_CONCEPTS = (
    "piano", "organ", "drums", "flute", "cello", "clarinet", "saxophone", "electric_guitar", "electric_piano",
    "harpsichord", "vibraphone", "accordion", "bass", "harp", "strings", "synth_lead",
)  # fmt: skip
HELDOUT_CONCEPTS = ("violin", "marimba", "trumpet", "nylon_guitar")

#: Words that name each instrument in prompts (the first is the canonical one, used by the text-control figure).
INSTRUMENT_WORDS: dict[str, tuple[str, ...]] = {
    "piano": ("piano", "acoustic piano", "grand piano"),
    "organ": ("organ", "church organ", "pipe organ"),
    "drums": ("drums", "drum kit", "drum groove"),
    "flute": ("flute", "solo flute"),
    "cello": ("cello", "solo cello"),
    "clarinet": ("clarinet", "solo clarinet"),
    "saxophone": ("saxophone", "alto sax", "sax"),
    "electric_guitar": ("electric guitar", "distorted guitar"),
    "electric_piano": ("electric piano", "rhodes"),
    "harpsichord": ("harpsichord",),
    "vibraphone": ("vibraphone", "vibes"),
    "accordion": ("accordion",),
    "bass": ("bass", "electric bass", "bass guitar"),
    "harp": ("harp", "concert harp"),
    "strings": ("strings", "string ensemble"),
    "synth_lead": ("synth lead", "sawtooth synth", "synthesizer"),
    "violin": ("violin",),
    "marimba": ("marimba",),
    "trumpet": ("trumpet",),
    "nylon_guitar": ("nylon guitar", "classical guitar"),
}
STYLE_WORDS = {
    "melody_chords": ("melody and chords", "chords"), "melody": ("melodic phrases", "riffs"),
    "legato": ("legato melody", "singing melody"), "organ": ("sustained chords", "chords and melody"),
    "fingerpick": ("fingerpicked", "picking pattern"), "arpeggios": ("arpeggios", "broken chords"),
    "marimba": ("repeated notes", "pattern"), "drums": ("groove", "beat"), "waltz": ("waltz",),
}  # fmt: skip
TEMPLATES = (
    "{inst}", "{inst}, {tempo}", "{tempo} {inst}, {style}", "{inst} {style}", "a {tempo} piece for {inst}",
    "{inst}, {style}, {tempo}, {register}", "{register} {inst} {style}", "{tempo} {style} on {inst}",
)  # fmt: skip


def descriptions_digest() -> str:
    """Digest of the word lists the corpus descriptions are drawn from (`INSTRUMENT_WORDS`, `STYLE_WORDS`,
    `TEMPLATES`): they shape the trained model as much as any config value, so the config records them."""
    blob = json.dumps({"instrument_words": INSTRUMENT_WORDS, "style_words": STYLE_WORDS, "templates": TEMPLATES},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: The word lists of tiny-v1 .. tiny-v4 (files written before the config recorded them).
TINY_V4_DESCRIPTIONS = "c626771718ca13c2"


@dataclass(frozen=True)
class LMConfig:
    dim: int = 256
    num_heads: int = 8
    num_layers: int = 4
    lut_bins: int = 1024
    lut_dim: int = 128
    # No dropout: the LM is compute-bound and under-trained (loss still falling at the last step), and on the CPU
    # audiocraft's dropout masks cost 40 % of a step (bernoulli_ sampling): 1.93 s -> 1.16 s per step at n_q = 4.
    dropout: float = 0.0


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the trained default model (recorded in the weights file)."""

    seed: int = 0
    train_concepts: tuple[str, ...] = TRAIN_CONCEPTS
    heldout_concepts: tuple[str, ...] = HELDOUT_CONCEPTS
    clips: int = 96  # compositions per training instrument
    # Compositions per instrument where they differ from `clips` (a rebalanced corpus; empty for the shipped model).
    clip_counts: dict[str, int] = field(default_factory=dict)
    clip_seconds: float = 8.0
    # which word lists the descriptions come from (`descriptions_digest()`); pretraining refuses a config whose
    # digest is not the code's, since it could not reproduce that corpus
    descriptions: str = field(default_factory=descriptions_digest)
    # 8 residual levels, beam-4 encoding, 2 passes of joint codebook refinement (why: docs/default_model.md).
    codec: MelCodecConfig = field(default_factory=lambda: MelCodecConfig(n_q=8, encode_beam=4))
    kmeans_iters: int = 12
    kmeans_sample: int = 120_000
    codec_refine_passes: int = 2
    lm: LMConfig = field(default_factory=LMConfig)
    steps: int = 2600
    batch_size: int = 16
    segment_seconds: float = 4.0
    lr: float = 1.5e-3
    warmup: int = 60
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    cfg_dropout: float = 0.15
    # Weight of each codebook in the LM's training loss (the weighted mean of the per-codebook cross-entropies;
    # empty: all equal, as audiocraft's solver). The coarsest level weighs 3x (why: docs/default_model.md).
    codebook_weights: tuple[float, ...] = (3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    checkpoint_every: int = 50

    def __post_init__(self):
        unknown = sorted(set(self.clip_counts) - set(self.train_concepts))
        if unknown:
            raise ValueError(f"clip_counts names {unknown}, which are not training instruments ("
                             f"{', '.join(self.train_concepts)}); drop them or add them to train_concepts")  # fmt: skip
        w = self.codebook_weights
        if w and (len(w) != self.codec.n_q or not all(math.isfinite(x) and x > 0 for x in w)):
            raise ValueError(f"codebook_weights={tuple(w)} must give one finite weight > 0 per codebook "
                             f"({self.codec.n_q}), or be empty for equal weights")  # fmt: skip
        bad = {k: v for k, v in self.clip_counts.items() if not (isinstance(v, int) and v >= 1)}
        if bad or self.clips < 1:
            raise ValueError(f"compositions per instrument must be whole numbers >= 1 (clips={self.clips}, "
                             f"clip_counts {bad or 'fine'})")  # fmt: skip

    def clips_of(self, name: str) -> int:
        """Compositions of training instrument `name` in the corpus."""
        return int(self.clip_counts.get(name, self.clips))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["codebook_weights"] = list(self.codebook_weights)
        # at the value files had before the key existed: recorded as they were (the same config dict and digest)
        for k in ("clip_counts", "descriptions", "codebook_weights"):
            if d[k] == ADDED_LATER[k]:
                del d[k]
        d["train_concepts"] = list(self.train_concepts)
        d["heldout_concepts"] = list(self.heldout_concepts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """The config a file records; keys added after the file was written take the value that means what the code
        did then (`ADDED_LATER`), not today's default."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown pretraining config keys {sorted(unknown)}")
        d = dict(d)
        for k, v in ADDED_LATER.items():  # a nested config (codec) gets its missing keys, a flat key its value
            d[k] = {**v, **d.get(k, {})} if isinstance(v, dict) else d.get(k, v)
        d["codec"] = MelCodecConfig(**d.get("codec", {}))
        d["lm"] = LMConfig(**d.get("lm", {}))
        for k in ("train_concepts", "heldout_concepts", "codebook_weights"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


#: Config keys added after a weights file format was in use, with the value that reproduces what older files did
#: (tiny-v2 was written before beam encoding and codebook refinement existed).
#: (tiny-v4 was written before per-instrument composition counts and the descriptions' digest were recorded.)
ADDED_LATER: dict[str, Any] = {"codec": {"encode_beam": 1}, "codec_refine_passes": 0, "clip_counts": {},
                               "descriptions": TINY_V4_DESCRIPTIONS, "codebook_weights": []}  # fmt: skip

#: A configuration small enough for unit tests (seconds, not minutes); same code path.
QUICK = PretrainConfig(
    train_concepts=("piano", "flute", "drums"), clips=3, clip_seconds=3.0,
    codec=MelCodecConfig(n_mels=64, bins=32, griffin_lim_iters=4), kmeans_iters=3, kmeans_sample=4000,
    lm=LMConfig(dim=32, num_heads=2, num_layers=1, lut_bins=64, lut_dim=16), steps=6, batch_size=2,
    segment_seconds=1.0, warmup=2, checkpoint_every=2, codebook_weights=(),  # its codec has 4 levels
)  # fmt: skip


def build_lm(cfg: PretrainConfig):
    from ..hosts.audiocraft.build import _lm

    c = cfg.lm
    lm = _lm(c.dim, c.num_heads, c.num_layers, n_q=cfg.codec.n_q, card=cfg.codec.bins, lut_bins=c.lut_bins,
             lut_dim=c.lut_dim, musicgen=False, cfg_dropout=cfg.cfg_dropout, dropout=c.dropout)  # fmt: skip
    return lm


@functools.cache
def _musicgen_class():
    from audiocraft.models import MusicGen

    class TrainedTinyMusicGen(MusicGen):
        """audiocraft's MusicGen whose `max_duration` is the LM's training segment (a few seconds, not 30): the
        extension stride defaults to half of it instead of audiocraft's fixed 18 s (which must be < max_duration)."""

        def set_generation_params(self, *args, extend_stride: float | None = None, **kwargs):
            if extend_stride is None:
                extend_stride = self.max_duration / 2
            return super().set_generation_params(*args, extend_stride=extend_stride, **kwargs)

    return TrainedTinyMusicGen


def build_musicgen(cfg: PretrainConfig, codec: MelRVQCodec, lm, name: str = "tiny"):
    from ..hosts.audiocraft.patches import install_identifiers

    # max_duration = the training segment (positions past it were never seen); longer clips are generated the way
    # MusicGen extends past its 30-s window: windows of `max_duration`, each prompted by the last half of the last.
    model = _musicgen_class()(name, codec.eval(), lm.eval(), max_duration=30.0)  # the constructor needs > 18 s
    model.max_duration = cfg.segment_seconds
    # The sampling settings its figures are measured with (top-k 64 at temperature 0.85, no guidance: why, in
    # docs/tuning.md, "Sampling of the default").
    model._ppt_fast_sampling = {"top_k": min(64, cfg.codec.bins), "cfg_coef": 1.0, "temp": TEMPERATURE}
    model._ppt_fast_trained_default = True  # tune()'s defaults for it: `ppt_fast.models.model_kind` says "trained"
    model.set_generation_params(duration=4.0, top_k=min(64, cfg.codec.bins), cfg_coef=1.0, temperature=TEMPERATURE)
    install_identifiers(model.lm)
    return model



class PretrainError(ValueError):
    """Pretraining cannot go on (a corrupted or mismatched checkpoint / weights file); the message says why and how."""


def _check_config(found: dict, cfg: PretrainConfig, path: str, what: str) -> None:
    try:  # keys added later (with defaults that mean the old behaviour) are filled in before comparing
        found = PretrainConfig.from_dict(found).to_dict()
    except (TypeError, ValueError) as e:
        raise PretrainError(f"{path}: this {what} has an unreadable pretraining config ({e})") from e
    if found != cfg.to_dict():
        diff = sorted(k for k in set(found) | set(cfg.to_dict()) if found.get(k) != cfg.to_dict().get(k))
        raise PretrainError(
            f"{path}: this {what} was made with a different pretraining config (differs in {', '.join(diff)}); "
            "use the config it was made with, or pass a fresh --workdir (or --fresh) to start over"
        )


_PAYLOADS: dict[tuple, dict] = {}


def load_trained(path: str = ASSET, *, expected: PretrainConfig | None = None, device: str | torch.device = "cpu",
                 name: str = "tiny"):  # fmt: skip
    """Load a weights file written by :func:`export` as an audiocraft `MusicGen` (identifier bank installed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"default-model weights {path} are missing; run `ppt-fast pretrain` (`make pretrain`) to make them, or use "
            "model='tiny-random'"
        )
    fix = "restore it from git (`git checkout -- ppt_fast/assets`) or re-make it with `ppt-fast pretrain`"
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    payload = _PAYLOADS.get(key)
    if payload is None:  # parsed once per file version; every call still builds fresh modules (tune mutates them)
        payload = load_checked(path, "default-model weights file", fix)
        _PAYLOADS.clear()
        _PAYLOADS[key] = payload
    if payload.get("format") != FORMAT:
        raise PretrainError(f"{path}: format {payload.get('format')!r} is not {FORMAT!r}; {fix}")
    cfg = PretrainConfig.from_dict(payload["config"])
    if expected is not None:
        _check_config(payload["config"], expected, path, "weights file")
    codec = MelRVQCodec(cfg.codec)
    lm = build_lm(cfg)
    try:
        codec.load_packed_state(payload["codec"])
        lm.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["lm"].items()})
    except (RuntimeError, ValueError) as e:
        raise PretrainError(f"{path}: weights do not match the config stored with them ({e}); {fix}") from e
    model = build_musicgen(cfg, codec, lm, name=name)
    model.compression_model.to(device)
    model.lm.to(device)
    return model


