"""Pretraining the embedded default model (`model="tiny"`): corpus -> codec -> LM, resumable, on a 2-core CPU.

No pretrained MusicGen / EnCodec / T5 weights can be had offline, so the default model is trained here from data the
project renders itself (`ppt_fast.eval.dataset`: seeded MIDI compositions through a General MIDI soundfont):

1. Corpus: `clips` compositions of `clip_seconds` for each of the 16 training instruments (registers shifted an
   octave down or up at random), each with a varied text description (instrument words, tempo word, register,
   playing style). Four instruments are **held out** (never seen by the codec or the LM) for concept learning:
   violin, marimba, trumpet, nylon guitar.
2. Codec: :class:`~ppt_fast.musicgen.melcodec.MelRVQCodec` (residual VQ over log-mel frames, Griffin-Lim decoder;
   why not a small EnCodec: see that module) fitted by k-means on the corpus' frames.
3. LM: audiocraft's `LMModel` (delay pattern, cross-attention on a LUT text conditioner with a word-hash tokenizer),
   trained with `MusicGenSolver`'s cross-entropy (the coarsest codebook weighted 3x, `codebook_weights`), AdamW,
   warmup + cosine, CFG dropout (so classifier-free guidance works at generation).

Everything is deterministic from `PretrainConfig.seed`. The LM phase writes a checked checkpoint (magic header +
sha256, atomic) every `checkpoint_every` steps and resumes from it; a corrupted checkpoint is refused with a clear
message; a checkpoint or weights file whose config differs from the run's is refused.

The result is one checked file (`ppt_fast/assets/tiny-v8.pt`: fp16 LM weights, the codec's codebooks as int8
with per-vector scales, the config) and a JSON sidecar with provenance (command, seed, versions, timings, losses).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from .. import _env
from .._io import CorruptFileError, atomic_write_bytes, check_writable, load_checked, save_checked
from .melcodec import MelCodecConfig, MelRVQCodec

logger = logging.getLogger(__name__)

FORMAT = "ppt_fast.tiny_model/2"  # /2: codebooks packed as int8 + per-vector scales
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
    # Compositions per instrument where they differ from `clips` (a rebalanced corpus). Empty for the shipped model:
    # the tiny-v5 candidate gave the six instruments tiny-v4 renders worst from their names 128-160 and lost on the
    # validation text control (0.490 vs 0.578; experiments/default_model), so it was not shipped.
    clip_counts: dict[str, int] = field(default_factory=dict)
    clip_seconds: float = 8.0
    # which word lists the descriptions come from (`descriptions_digest()`); pretraining refuses a config whose
    # digest is not the code's, since it could not reproduce that corpus
    descriptions: str = field(default_factory=descriptions_digest)
    # 8 residual levels: musicnn retrieval of re-synthesised new compositions of the trained instruments 81 % vs
    # 67 % with 4 (73 % with 6; 8 x 512 entries 77 %), codecs fitted on the 48-clip corpus -- experiments/default_model.
    # tiny-v3: beam-4 encoding and 2 passes of joint codebook refinement: coding error of held-out corpus frames
    # 2.80 % -> 2.45 % of their variance (greedy, unrefined -> refined + beam 4; experiments/default_model).
    codec: MelCodecConfig = field(default_factory=lambda: MelCodecConfig(n_q=8, encode_beam=4))
    kmeans_iters: int = 12
    kmeans_sample: int = 120_000
    codec_refine_passes: int = 2
    lm: LMConfig = field(default_factory=LMConfig)
    steps: int = 2600  # tiny-v4: the pattern-layout loss (musicgen/loss.py) made a step 1.6x cheaper
    batch_size: int = 16
    segment_seconds: float = 4.0
    lr: float = 1.5e-3
    warmup: int = 60
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    cfg_dropout: float = 0.15
    # Weight of each codebook in the LM's training loss (the weighted mean of the per-codebook cross-entropies);
    # empty: all equal, as audiocraft's solver and tiny-v4. The coarsest level carries most of what a prompt says
    # about the clip (experiments/probes/discrimination_probe.py on tiny-v4: own-prompt gain 0.73 nats at level 0,
    # 0.16 at 7), so tiny-v8 weights it 3x: validation text control 57.8 % -> 58.3 %, figure seed 50.5 % -> 56.8 %,
    # piano / harpsichord / harp sampled as themselves 2 / 5 / 8 of 12 (tiny-v4 0 / 1 / 1) -- experiments/default_model.
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


# ---------------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------------
def clip_seed(name: str, base_seed: int, index: int) -> int:
    """Seeds of pretraining compositions, disjoint from the concept dataset's (which use indices < 1000)."""
    from ..eval.dataset import concept_seed

    return concept_seed(name, base_seed, 100_000 + index)


def _clip_spec(name: str, seed: int, shift: int | None = None):
    """The concept spec of one corpus clip (register shifted -12 / 0 / +12 by the seed, or by `shift` in octaves)
    and its register word."""
    import numpy as np

    from ..eval.dataset import CONCEPTS

    spec = CONCEPTS[name]
    if spec.is_drum:
        return spec, ""
    if shift is None:
        shift = int(np.random.default_rng(seed ^ 0x5EED).integers(-1, 2))
    if not (12 <= spec.low + 12 * shift and spec.high + 12 * shift <= 108):
        shift = 0
    word = {-1: "low", 0: "", 1: "high"}[shift]
    return replace(spec, low=spec.low + 12 * shift, high=spec.high + 12 * shift), word


def tempo_word(bpm: float) -> str:
    return "slow" if bpm < 85 else ("medium tempo" if bpm < 115 else "fast")


def describe(name: str, seed: int, g: torch.Generator) -> str:
    """A random text description of corpus clip (name, seed): instrument words, tempo, register, style."""
    from ..eval.dataset import CONCEPTS, composition_tempo

    spec, register = _clip_spec(name, seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    template = pick(TEMPLATES)
    if "{register}" in template and not register:
        template = "{inst}, {style}, {tempo}"
    text = template.format(
        inst=pick(INSTRUMENT_WORDS[name]),
        tempo=tempo_word(composition_tempo(CONCEPTS[name], seed)),
        style=pick(STYLE_WORDS.get(spec.style, ("music",))),
        register=f"{register} register" if register else "",
    )
    return " ".join(text.split())


def render_clip(name: str, seed: int, seconds: float, sample_rate: int, shift: int | None = None) -> torch.Tensor:
    """Mono float32 `[T]` of one composition of `name` (register as in the corpus, or `shift` octaves)."""
    from ..eval.dataset import compose, render

    spec, _ = _clip_spec(name, seed, shift)
    return torch.from_numpy(render(compose(spec, seed, seconds), spec, seconds, sample_rate=sample_rate))


@dataclass
class Corpus:
    names: list[str]  # instrument of each clip
    seeds: list[int]
    codes: torch.Tensor  # int16 [N, K, F]


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def build_lm(cfg: PretrainConfig):
    from .models import _lm

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
    from . import identifiers

    # max_duration = the training segment: positions past it were never seen, and generating on from there drifts
    # (tiny-v2, 9-s clips, text-control top-1 per 3-s window: 0.56 / 0.25 / 0.21). Longer clips are generated the
    # way MusicGen extends past its 30-s training length: windows of `max_duration`, each prompted by the last half
    # of the one before (0.56 / 0.48 / 0.48).
    model = _musicgen_class()(name, codec.eval(), lm.eval(), max_duration=30.0)  # the constructor needs > 18 s
    model.max_duration = cfg.segment_seconds
    # Sampling settings for the trained default (experiments/default_model): this small, briefly trained LM drifts into
    # noise at temperature 1 and with classifier-free guidance; top-k 64 at 0.7 without guidance scored best of the
    # validation sweep on tiny-v3 (text control 58 %; 0.6: 50 %, 0.5: 44 %, smaller top-k lower). On tiny-v4, 8 at 0.7
    # led 64 at 0.7 by two clips of 48 (60 % vs 56 %), inside the noise, after being tiny-v3's worst: 64 / 0.7 kept.
    model._ppt_fast_sampling = {"top_k": min(64, cfg.codec.bins), "cfg_coef": 1.0, "temp": 0.7}
    model._ppt_fast_trained_default = True  # tune()'s defaults for it are the trained default's (`models.model_kind`)
    model.set_generation_params(duration=4.0, top_k=min(64, cfg.codec.bins), cfg_coef=1.0, temperature=0.7)
    identifiers.install(model.lm)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
class PretrainError(ValueError):
    """Pretraining cannot go on (a corrupted or mismatched checkpoint / weights file); the message says why and how."""


def _lr(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


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


def _load_run_file(path: str, cfg: PretrainConfig, what: str, fix: str) -> dict:
    """A checked file of this run (corpus cache or checkpoint): refused when corrupted or made with another config."""
    try:
        data = load_checked(path, f"pretraining {what}", fix)
    except CorruptFileError as e:
        raise PretrainError(str(e)) from e
    _check_config(data["config"], cfg, path, what)
    return data


def _check_descriptions(cfg: PretrainConfig) -> None:
    if cfg.descriptions != descriptions_digest():
        raise PretrainError(
            f"this config's descriptions come from other word lists (digest {cfg.descriptions}) than this code's "
            f"({descriptions_digest()}): it cannot be re-made from here; check out the commit that made it, or use "
            "the code's lists (leave `descriptions` at its default)"
        )


def prepare(cfg: PretrainConfig, workdir: str, *, verbose: bool = True) -> tuple[MelRVQCodec, Corpus, dict]:
    """Render the corpus, fit the codec and encode the corpus (cached in `workdir/data.pt`)."""
    _check_descriptions(cfg)
    path = os.path.join(workdir, "data.pt")
    codec = MelRVQCodec(cfg.codec)
    if os.path.isfile(path):
        data = _load_run_file(path, cfg, "corpus cache", "delete it (or pass --fresh) to rebuild it")
        codec.load_state_dict(data["codec"])
        return codec, Corpus(data["names"], data["seeds"], data["codes"]), data["timings"]
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    names, seeds, audio = [], [], []
    for name in cfg.train_concepts:
        for i in range(cfg.clips_of(name)):
            s = clip_seed(name, cfg.seed, i)
            names.append(name)
            seeds.append(s)
            audio.append(render_clip(name, s, cfg.clip_seconds, cfg.codec.sample_rate))
    timings["render_s"] = time.perf_counter() - t0
    if verbose:
        print(f"[pretrain] corpus: {len(audio)} clips x {cfg.clip_seconds:g} s rendered in {timings['render_s']:.1f} s")
    t0 = time.perf_counter()
    batch = torch.stack(audio).unsqueeze(1)  # [N, 1, T]
    with torch.no_grad():
        frames = torch.cat([codec.log_mel(batch[i : i + 32]).flatten(0, 1) for i in range(0, batch.shape[0], 32)])
    fit = codec.fit(frames, iters=cfg.kmeans_iters, sample=cfg.kmeans_sample, seed=cfg.seed,
                    refine_passes=cfg.codec_refine_passes)  # fmt: skip
    timings["codec_fit_s"] = time.perf_counter() - t0
    if verbose:
        res = ", ".join(f"{e:.3f}" for e in fit["residual_energy"])
        if "refined_error" in fit:
            res += "; coding error before / after each refinement pass: " + ", ".join(
                f"{e:.4f}" for e in fit["refined_error"]
            )
        print(f"[pretrain] codec: {cfg.codec.n_q} x {cfg.codec.bins} codes fitted on {frames.shape[0]} frames in "
              f"{timings['codec_fit_s']:.1f} s (residual energy per level: {res})")  # fmt: skip
    t0 = time.perf_counter()
    with torch.no_grad():
        codes = torch.cat([codec.encode(batch[i : i + 32])[0] for i in range(0, batch.shape[0], 32)]).to(torch.int16)
    timings["encode_s"] = time.perf_counter() - t0
    data = {"config": cfg.to_dict(), "codec": codec.state_dict(), "names": names, "seeds": seeds, "codes": codes,
            "timings": timings, "residual_energy": fit["residual_energy"],
            "refined_error": fit.get("refined_error")}  # fmt: skip
    save_checked(data, path)
    return codec, Corpus(names, seeds, codes), timings


def _batch(corpus: Corpus, cfg: PretrainConfig, g: torch.Generator):
    from audiocraft.modules.conditioners import ConditioningAttributes

    n, _, f = corpus.codes.shape
    seg = min(f, int(round(cfg.segment_seconds * cfg.codec.frame_rate)))
    pick = torch.randint(0, n, (cfg.batch_size,), generator=g).tolist()
    starts = torch.randint(0, f - seg + 1, (cfg.batch_size,), generator=g).tolist()
    codes = torch.stack([corpus.codes[i, :, s : s + seg] for i, s in zip(pick, starts)]).long()
    attrs = [ConditioningAttributes(text={"description": describe(corpus.names[i], corpus.seeds[i], g)}) for i in pick]
    return codes, attrs


def _loss(lm, codes, attrs, weights: tuple[float, ...] = ()) -> tuple[torch.Tensor, float]:
    """(the loss to minimise, MusicGenSolver's loss) after classifier-free-guidance dropout (train mode), as the
    solver does. The solver's loss is the mean of the per-codebook cross-entropies (`tune._loss`); with `weights`
    the loss to minimise is their weighted mean instead (the same value when the weights are equal)."""
    from .loss import pattern_cross_entropy

    provider = lm.condition_provider
    cond = provider(provider.tokenize(lm.cfg_dropout(attrs)))
    loss, per_codebook = pattern_cross_entropy(lm, codes, cond, weights=weights or None)
    return loss, float(per_codebook.mean())


def train_lm(cfg: PretrainConfig, corpus: Corpus, workdir: str, *, verbose: bool = True, stop_after: int | None = None):
    """Train the LM; resume from `workdir/checkpoint.pt` when present. Returns (lm, losses, seconds)."""
    torch.manual_seed(cfg.seed + 1)
    lm = build_lm(cfg)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    ckpt = os.path.join(workdir, "checkpoint.pt")
    step, losses, seconds = 0, [], 0.0
    if os.path.isfile(ckpt):
        state = _load_run_file(
            ckpt, cfg, "checkpoint", "delete it (or pass --fresh) to restart the LM phase from step 0"
        )
        lm.load_state_dict(state["lm"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        lm.cfg_dropout.rng.set_state(state["cfg_dropout_rng"])  # audiocraft's CFG dropout has its own generator
        step, losses, seconds = state["step"], list(state["losses"]), float(state["seconds"])
        if verbose:
            print(f"[pretrain] resuming the LM phase at step {step}/{cfg.steps} from {ckpt}")
    lm.train()
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="pretrain lm", unit="step", dynamic_ncols=True)
    t_last = time.perf_counter()
    while step < cfg.steps:
        codes, attrs = _batch(corpus, cfg, g)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        loss, solver_loss = _loss(lm, codes, attrs, cfg.codebook_weights)
        if not torch.isfinite(loss):
            raise PretrainError(f"LM loss became {float(loss)} at step {step}; lower --lr or check the corpus")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm)
        opt.step()
        step += 1
        losses.append(solver_loss)  # the solver's (unweighted) loss, comparable across weightings
        now = time.perf_counter()
        seconds += now - t_last
        t_last = now
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{_lr(step - 1, cfg):.1e}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"config": cfg.to_dict(), "step": step, "lm": lm.state_dict(), "opt": opt.state_dict(),
                     "generator": g.get_state(), "torch_rng": torch.get_rng_state(),
                     "cfg_dropout_rng": lm.cfg_dropout.rng.get_state(), "losses": losses,
                     "seconds": seconds}  # fmt: skip
            save_checked(state, ckpt)
            t_last = time.perf_counter()  # checkpoint time is not training time
        if stop_after is not None and step >= stop_after:
            break
    if bar is not None:
        bar.close()
    return lm.eval(), losses, seconds


def export(cfg: PretrainConfig, codec: MelRVQCodec, lm, out: str, provenance: dict) -> dict:
    """Write the weights file (fp16 LM floats, the codec packed: int8 codebooks with per-vector scales, fp32
    standardisation; the config) and its JSON sidecar (returned)."""
    lm_state = {k: (v.half() if v.is_floating_point() else v) for k, v in lm.state_dict().items()}
    payload = {"format": FORMAT, "config": cfg.to_dict(), "codec": codec.packed_state(), "lm": lm_state}
    sha = save_checked(payload, out)
    provenance = dict(provenance, sha256=sha, bytes=os.path.getsize(out), format=FORMAT, config=cfg.to_dict())
    atomic_write_bytes(os.path.splitext(out)[0] + ".json", (json.dumps(provenance, indent=2) + "\n").encode())
    return provenance


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


def _versions() -> dict[str, str]:
    import numpy

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": str(torch.get_num_threads()),
    }
    for mod in ("audiocraft", "tinysoundfont"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "unknown"
    return out


def _cli_command() -> str | None:
    """The `ppt-fast ...` command line this process runs (the console script or `python -m ppt_fast.cli`), else
    None (pretrain() called from Python)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith("ppt-fast") or argv0.replace(os.sep, "/").endswith("ppt_fast/cli.py"):
        return " ".join(["ppt-fast", *sys.argv[1:]])
    return None


def pretrain(cfg: PretrainConfig = PretrainConfig(), *, out: str = ASSET, workdir: str | None = None,
             fresh: bool = False, verbose: bool = True, stop_after: int | None = None) -> dict:  # fmt: skip
    """The whole pretraining (corpus, codec, LM), resumable; writes `out` (+ `.json`). Returns the provenance dict.

    `stop_after`: stop the LM phase after that many steps (as an interruption would) without exporting.
    """
    # The weights and their JSON are written ~50 min from now: an output that cannot be written is refused first.
    check_writable(out)
    check_writable(os.path.splitext(out)[0] + ".json")
    workdir = workdir or os.path.join(_env.cache_dir(), "pretrain", cfg.digest())
    if fresh:
        for f in ("data.pt", "checkpoint.pt"):
            if os.path.exists(os.path.join(workdir, f)):
                os.unlink(os.path.join(workdir, f))
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    codec, corpus, timings = prepare(cfg, workdir, verbose=verbose)
    lm, losses, lm_seconds = train_lm(cfg, corpus, workdir, verbose=verbose, stop_after=stop_after)
    if len(losses) < cfg.steps:
        return {"stopped_at": len(losses), "workdir": workdir}
    provenance = {
        "command": _cli_command(),
        "workdir": workdir,
        "seed": cfg.seed,
        # pipeline_s: render + codec fit + encode + LM training, summed over every (resumed) run that made them
        "timings": dict(
            timings,
            lm_s=lm_seconds,
            pipeline_s=sum(timings.values()) + lm_seconds,
            this_run_wall_s=time.perf_counter() - t0,
        ),
        "losses_every_10": [
            round(sum(losses[i : i + 10]) / len(losses[i : i + 10]), 4) for i in range(0, len(losses), 10)
        ],
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "corpus": {
            "clips": len(corpus.names),
            "seconds": len(corpus.names) * cfg.clip_seconds,
            "frames": int(corpus.codes.shape[0] * corpus.codes.shape[2]),
        },  # fmt: skip
        "versions": _versions(),
        "lm_parameters": sum(p.numel() for p in lm.parameters()),
    }
    provenance = export(cfg, codec, lm, out, provenance)
    if verbose:
        size = os.path.getsize(out) / 2**20
        print(f"[pretrain] wrote {out} ({size:.1f} MiB); final loss {provenance['final_loss']:.3f}")
    return provenance
