"""A concept dataset rendered offline and deterministically from seeds: MIDI compositions -> General MIDI soundfont.

Each concept (an instrument timbre, or a playing style on a shared instrument) gets one reference clip (2 min by
default, what the method tunes on) and several held-out clips of *different compositions* (other seeds), which the
metrics use to check that an embedding follows the concept rather than the notes.

Renderers:

- ``tinysoundfont`` (default, pip only): the ``tinysoundfont`` wheel with the GM soundfont that ``pretty_midi`` ships
  (TimGM6mb.sf2, GPL-2). Sample-exact: the synth is stepped from note event to note event in Python.
- ``fluidsynth``: Debian's ``fluidsynth`` binary with ``fluid-soundfont-gm`` (FluidR3_GM.sf2, MIT); better sound.

Everything depends only on (concept, seed, renderer, soundfont, sample rate, seconds): the same arguments give the
same WAV bytes on the same machine and library versions. This module needs numpy only (no torch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import wave
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "ppt_fast.concepts/1"
RENDERERS = ("tinysoundfont", "fluidsynth")
FLUID_R3 = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
DRUM_CHANNEL = 9


@dataclass(frozen=True)
class ConceptSpec:
    """One concept: GM program, how its compositions are written, and words that describe it (prompts, tags)."""

    name: str
    description: str
    program: int  # GM program 0-127 (ignored for drums)
    style: (
        str  # composition generator: melody_chords | legato | fingerpick | arpeggios | waltz | marimba | drums | organ
    )
    low: int  # melodic range (MIDI notes)
    high: int
    tempo: tuple[int, int]  # bpm range
    tags: tuple[str, ...] = ()  # MTT tag words that describe it (for the tag-alignment proxy)
    is_drum: bool = False


CONCEPTS: dict[str, ConceptSpec] = {
    c.name: c
    for c in (
        ConceptSpec("piano", "acoustic grand piano, melody over block chords", 0, "melody_chords", 55, 84, (80, 110),
                    ("piano",)),
        ConceptSpec("violin", "solo violin, legato melody", 40, "legato", 55, 88, (66, 96), ("violin", "strings")),
        ConceptSpec("nylon_guitar", "nylon-string guitar, fingerpicked", 24, "fingerpick", 40, 76, (70, 100),
                    ("guitar",)),
        ConceptSpec("trumpet", "solo trumpet phrases", 56, "melody", 55, 82, (90, 128), ()),
        ConceptSpec("flute", "solo flute melody", 73, "legato", 60, 93, (72, 104), ("flute",)),
        ConceptSpec("organ", "church organ chords and melody", 19, "organ", 48, 79, (60, 84), ()),
        ConceptSpec("marimba", "marimba, repeated-note patterns", 12, "marimba", 60, 88, (100, 132), ()),
        ConceptSpec("drums", "drum kit grooves", 0, "drums", 0, 127, (88, 140), ("drums", "beat"), is_drum=True),
        ConceptSpec("piano_waltz", "piano waltz in 3/4, oom-pah-pah", 0, "waltz", 60, 84, (150, 180),
                    ("piano", "classical")),
        ConceptSpec("piano_arpeggios", "piano, fast sixteenth-note arpeggios", 0, "arpeggios", 48, 84, (104, 128),
                    ("piano", "fast")),
        # More timbres for the pretraining corpus of the embedded default model (`ppt-fast pretrain`).
        ConceptSpec("cello", "solo cello, legato melody", 42, "legato", 36, 67, (60, 92), ("cello", "strings")),
        ConceptSpec("clarinet", "solo clarinet melody", 71, "legato", 50, 84, (72, 108), ()),
        ConceptSpec("saxophone", "alto saxophone phrases", 65, "melody", 49, 81, (84, 124), ()),
        ConceptSpec("electric_guitar", "distorted electric guitar riffs", 30, "melody", 40, 72, (96, 136),
                    ("guitar", "rock")),
        ConceptSpec("electric_piano", "electric piano, melody over chords", 4, "melody_chords", 48, 84, (76, 110),
                    ("piano",)),
        ConceptSpec("harpsichord", "harpsichord arpeggios", 6, "arpeggios", 48, 84, (90, 120), ("harpsichord",)),
        ConceptSpec("vibraphone", "vibraphone, repeated-note patterns", 11, "marimba", 53, 89, (90, 124), ()),
        ConceptSpec("accordion", "accordion chords and melody", 21, "organ", 53, 84, (80, 116), ()),
        ConceptSpec("bass", "electric bass lines", 33, "melody", 28, 55, (84, 124), ("bass",)),
        ConceptSpec("harp", "harp arpeggios", 46, "arpeggios", 40, 88, (70, 100), ("harp",)),
        ConceptSpec("strings", "string ensemble chords and melody", 48, "organ", 48, 84, (60, 90), ("strings",)),
        ConceptSpec("synth_lead", "sawtooth synth lead", 81, "melody", 55, 84, (110, 140), ("synth", "electronic")),
    )
}  # fmt: skip

#: The concept dataset's default set (8 timbres + 2 piano playing styles); the rest of CONCEPTS feeds pretraining.
EVAL_CONCEPTS = ("piano", "violin", "nylon_guitar", "trumpet", "flute", "organ", "marimba", "drums", "piano_waltz",
                 "piano_arpeggios")  # fmt: skip

SOUNDFONT_LICENCES = {
    "TimGM6mb.sf2": "GPL-2.0 (TimGM6mb by Tim Brechbill, shipped in the pretty_midi wheel)",
    "FluidR3_GM.sf2": "MIT (FluidR3_GM by Frank Wen, Debian package fluid-soundfont-gm)",
}


# --------------------------------------------------------------------------------------------------------------------
# Compositions: note events from a seed.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    start: float  # seconds
    end: float
    pitch: int
    velocity: int
    channel: int = 0


_PROGRESSIONS = ([0, 5, 3, 4], [0, 3, 4, 0], [5, 3, 0, 4], [0, 4, 5, 3], [1, 4, 0, 0], [0, 5, 1, 4], [3, 4, 2, 5])
_MAJOR = [0, 2, 4, 5, 7, 9, 11]
_MINOR = [0, 2, 3, 5, 7, 8, 10]


class _Harmony:
    def __init__(self, rng: np.random.Generator):
        self.root = int(rng.integers(0, 12))
        self.scale = _MAJOR if rng.random() < 0.6 else _MINOR
        self.progression = _PROGRESSIONS[int(rng.integers(len(_PROGRESSIONS)))]

    def degree_pitch(self, degree: int, octave_base: int) -> int:
        octave, step = divmod(degree, 7)
        return octave_base + self.root + 12 * octave + self.scale[step]

    def chord(self, bar: int) -> int:
        return self.progression[bar % len(self.progression)]

    def chord_pitches(self, bar: int, low: int, count: int = 3) -> list[int]:
        d = self.chord(bar)
        base = low - (low % 12)
        pitches = [self.degree_pitch(d + 2 * i, base) for i in range(count)]
        return [p + 12 if p < low else p for p in pitches]

    def scale_pitches(self, low: int, high: int) -> list[int]:
        return [p for p in range(low, high + 1) if (p - self.root) % 12 in self.scale]


def _melody_line(rng, harmony, spec, t0, bar_len, bar, rhythm_pool, legato, prev):
    pitches = harmony.scale_pitches(spec.low, spec.high)
    rhythm = rhythm_pool[int(rng.integers(len(rhythm_pool)))]
    notes, t, idx = [], t0, prev if prev is not None else len(pitches) // 2
    chord_tones = {p % 12 for p in harmony.chord_pitches(bar, 48)}
    for beats in rhythm:
        dur = beats * bar_len / sum(rhythm)
        idx = int(np.clip(idx + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]), 0, len(pitches) - 1))
        if t == t0 and pitches[idx] % 12 not in chord_tones:  # land on a chord tone on the downbeat
            for k in (1, -1, 2, -2):
                if 0 <= idx + k < len(pitches) and pitches[idx + k] % 12 in chord_tones:
                    idx += k
                    break
        if rng.random() > 0.08:  # occasional rest
            notes.append(Note(t, t + dur * (1.0 if legato else 0.8), pitches[idx], int(rng.integers(70, 105))))
        t += dur
    return notes, idx


_RHYTHMS_4 = ([1, 1, 1, 1], [2, 1, 1], [1, 1, 2], [1.5, 0.5, 1, 1], [0.5, 0.5, 1, 1, 1], [2, 2], [1, 0.5, 0.5, 2])
_RHYTHMS_LEGATO = ([2, 2], [3, 1], [4], [1, 1, 2], [2, 1, 1])


def _start(spec: ConceptSpec, seed: int) -> tuple[np.random.Generator, _Harmony, float]:
    rng = np.random.default_rng(seed)
    harmony = _Harmony(rng)
    return rng, harmony, float(rng.integers(spec.tempo[0], spec.tempo[1] + 1))


def composition_tempo(spec: ConceptSpec, seed: int) -> float:
    """The tempo (bpm) :func:`compose` picks for `spec` and `seed` (for text descriptions of rendered clips)."""
    return _start(spec, seed)[2]


def compose(spec: ConceptSpec, seed: int, seconds: float) -> list[Note]:
    """Note events of one composition for `spec` (deterministic in `seed`), covering `seconds`."""
    rng, harmony, bpm = _start(spec, seed)
    beat = 60.0 / bpm
    beats_per_bar = 3 if spec.style == "waltz" else 4
    bar_len = beat * beats_per_bar
    notes: list[Note] = []
    prev = None
    bar = 0
    while bar * bar_len < seconds:
        t0 = bar * bar_len
        chord = harmony.chord_pitches(bar, 48)
        if spec.style in ("melody_chords", "melody"):
            line, prev = _melody_line(rng, harmony, spec, t0, bar_len, bar, _RHYTHMS_4, False, prev)
            notes += line
            if spec.style == "melody_chords":
                for half in range(2):
                    for p in chord:
                        notes.append(Note(t0 + half * bar_len / 2, t0 + (half + 0.95) * bar_len / 2, p, 62))
        elif spec.style == "legato":
            line, prev = _melody_line(rng, harmony, spec, t0, bar_len, bar, _RHYTHMS_LEGATO, True, prev)
            notes += line
        elif spec.style == "organ":
            line, prev = _melody_line(rng, harmony, spec, t0, bar_len, bar, _RHYTHMS_LEGATO, True, prev)
            notes += line
            notes += [Note(t0, t0 + bar_len * 0.98, p, 70) for p in chord]
            notes.append(Note(t0, t0 + bar_len * 0.98, chord[0] - 12, 72))
        elif spec.style == "fingerpick":
            bass = chord[0] - 12
            pattern = [bass, chord[1], chord[2], chord[1] + 12, bass + 7, chord[2], chord[1], chord[2] + 12]
            shift = int(rng.integers(0, 3))
            for i in range(8):
                p = pattern[(i + shift) % 8] if i else bass
                notes.append(Note(t0 + i * beat / 2, t0 + (i + 1.8) * beat / 2, p, int(rng.integers(60, 90))))
        elif spec.style == "arpeggios":
            up = [chord[0] - 12, *chord, chord[0] + 12, chord[1] + 12, chord[2] + 12, chord[0] + 24]
            shape = up + up[-2:0:-1]
            for i in range(16):
                p = shape[i % len(shape)]
                notes.append(Note(t0 + i * beat / 4, t0 + (i + 1) * beat / 4, p, int(rng.integers(64, 92))))
        elif spec.style == "waltz":
            notes.append(Note(t0, t0 + beat * 0.9, chord[0] - 12, 80))
            for b in (1, 2):
                notes += [Note(t0 + b * beat, t0 + (b + 0.6) * beat, p, 58) for p in chord]
            line, prev = _melody_line(rng, harmony, spec, t0, bar_len, bar, ([2, 1], [1, 1, 1], [3], [1, 2]), False,
                                      prev)  # fmt: skip
            notes += [Note(n.start, n.end, n.pitch + 12 if n.pitch < 67 else n.pitch, n.velocity) for n in line]
        elif spec.style == "marimba":
            pitches = harmony.scale_pitches(spec.low, spec.high)
            idx = prev if prev is not None else len(pitches) // 2
            for i in range(8):
                if i % 2 == 0:
                    idx = int(np.clip(idx + rng.choice([-2, -1, 1, 2, 0]), 0, len(pitches) - 1))
                notes.append(
                    Note(t0 + i * beat / 2, t0 + (i + 0.9) * beat / 2, pitches[idx], int(rng.integers(70, 110)))
                )
            notes += [Note(t0, t0 + beat, chord[0], 70), Note(t0 + 2 * beat, t0 + 3 * beat, chord[2], 66)]
            prev = idx
        elif spec.style == "drums":
            if bar == 0:
                groove = int(rng.integers(3))
            for i in range(8):
                t = t0 + i * beat / 2
                hat = 46 if (groove == 2 and i % 2 == 1) else (51 if groove == 1 else 42)
                notes.append(Note(t, t + 0.1, hat, int(rng.integers(60, 95)), DRUM_CHANNEL))
                if i in (0, 4) or (i == 5 and rng.random() < 0.4) or (i == 3 and groove == 2):
                    notes.append(Note(t, t + 0.1, 36, int(rng.integers(95, 120)), DRUM_CHANNEL))
                if i in (2, 6):
                    notes.append(Note(t, t + 0.1, 38, int(rng.integers(90, 120)), DRUM_CHANNEL))
            if bar % 8 == 7:  # a tom fill and a crash on the next downbeat
                for i, tom in enumerate((50, 47, 45, 45)):
                    t = t0 + 3 * beat + i * beat / 4
                    notes.append(Note(t, t + 0.1, tom, 100, DRUM_CHANNEL))
                notes.append(Note(t0 + bar_len, t0 + bar_len + 0.5, 49, 100, DRUM_CHANNEL))
        else:
            raise ValueError(f"unknown composition style {spec.style!r}")
        bar += 1
    if spec.is_drum:
        return [n for n in notes if n.start < seconds]
    return [Note(n.start, n.end, n.pitch, n.velocity, 0) for n in notes if n.start < seconds]


# --------------------------------------------------------------------------------------------------------------------
# Renderers.
# --------------------------------------------------------------------------------------------------------------------


def default_soundfont(renderer: str) -> str:
    """The soundfont each renderer uses unless told otherwise (raises with an install hint when missing)."""
    if renderer == "tinysoundfont":
        spec = importlib.util.find_spec("pretty_midi")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "renderer 'tinysoundfont' uses the GM soundfont shipped in pretty_midi: `pip install pretty_midi`"
                " (or pass soundfont=PATH to an .sf2 file)"
            )
        return os.path.join(list(spec.submodule_search_locations)[0], "TimGM6mb.sf2")
    if renderer == "fluidsynth":
        return FLUID_R3
    raise ValueError(f"renderer={renderer!r}: choose one of {', '.join(RENDERERS)}")


def check_renderer(renderer: str, soundfont: str | None = None) -> str:
    """Check that `renderer` can run; return the soundfont path. Errors name what to install."""
    if renderer not in RENDERERS:
        raise ValueError(f"renderer={renderer!r}: choose one of {', '.join(RENDERERS)}")
    sf = soundfont or default_soundfont(renderer)
    if renderer == "tinysoundfont" and importlib.util.find_spec("tinysoundfont") is None:
        raise ModuleNotFoundError("renderer 'tinysoundfont' needs `pip install --no-deps tinysoundfont`")
    if renderer == "fluidsynth" and shutil.which("fluidsynth") is None:
        raise FileNotFoundError(
            "renderer 'fluidsynth' needs the fluidsynth binary: `apt-get install fluidsynth fluid-soundfont-gm`"
            " (or use --renderer tinysoundfont, which needs only pip packages)"
        )
    if not os.path.isfile(sf):
        hint = "apt-get install fluid-soundfont-gm" if sf == FLUID_R3 else "pass an existing .sf2 path"
        raise FileNotFoundError(f"soundfont {sf} not found: {hint}")
    return sf


def _programs(spec: ConceptSpec) -> dict[int, tuple[int, bool]]:
    return {DRUM_CHANNEL: (0, True)} if spec.is_drum else {0: (spec.program, False)}


def _render_tinysoundfont(notes: Sequence[Note], programs, seconds, sample_rate, soundfont) -> np.ndarray:
    import tinysoundfont

    synth = tinysoundfont.Synth(gain=-6.0, samplerate=sample_rate)
    sfid = synth.sfload(soundfont)
    for chan, (program, drums) in programs.items():
        synth.program_select(chan, sfid, 128 if drums else 0, program, is_drums=drums)
    events = sorted(
        [(round(n.start * sample_rate), 1, n.channel, n.pitch, n.velocity) for n in notes]
        + [(round(n.end * sample_rate), 0, n.channel, n.pitch, 0) for n in notes]
    )  # at equal times note-offs (0) come first, so a repeated pitch re-strikes
    total = round(seconds * sample_rate)
    out = np.zeros((total, 2), dtype=np.float32)
    pos = 0
    for when, on, chan, pitch, velocity in events:
        when = min(when, total)
        if when > pos:
            out[pos:when] = np.frombuffer(synth.generate(when - pos), dtype=np.float32).reshape(-1, 2)
            pos = when
        if pos >= total:
            break
        if on:
            synth.noteon(chan, pitch, velocity)
        else:
            synth.noteoff(chan, pitch)
    if pos < total:
        out[pos:] = np.frombuffer(synth.generate(total - pos), dtype=np.float32).reshape(-1, 2)
    return out.mean(axis=1)


def write_midi(notes: Sequence[Note], programs, path: str) -> None:
    """A format-0 standard MIDI file at 120 bpm, 480 ticks per beat (1 s = 960 ticks)."""

    def vlq(n: int) -> bytes:
        out = [n & 0x7F]
        n >>= 7
        while n:
            out.append(0x80 | (n & 0x7F))
            n >>= 7
        return bytes(reversed(out))

    events = [(0, 0, bytes([0xFF, 0x51, 0x03, 0x07, 0xA1, 0x20]))]
    for chan, (program, drums) in programs.items():
        if not drums:
            events.append((0, 1, bytes([0xC0 | chan, program])))
    for n in notes:
        events.append((round(n.start * 960), 3, bytes([0x90 | n.channel, n.pitch, n.velocity])))
        events.append((round(n.end * 960), 2, bytes([0x80 | n.channel, n.pitch, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track, now = bytearray(), 0
    for tick, _, data in events:
        track += vlq(tick - now) + data
        now = tick
    track += vlq(0) + bytes([0xFF, 0x2F, 0x00])
    with open(path, "wb") as f:
        f.write(
            b"MThd"
            + (6).to_bytes(4, "big")
            + (0).to_bytes(2, "big")
            + (1).to_bytes(2, "big")
            + (480).to_bytes(2, "big")
        )
        f.write(b"MTrk" + len(track).to_bytes(4, "big") + bytes(track))


def _render_fluidsynth(notes: Sequence[Note], programs, seconds, sample_rate, soundfont) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        mid, wav = os.path.join(tmp, "clip.mid"), os.path.join(tmp, "clip.wav")
        write_midi(notes, programs, mid)
        cmd = ["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", str(sample_rate), "-F", wav, "-T", "wav", "-O", "s16",
               soundfont, mid]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not os.path.exists(wav):
            raise RuntimeError(f"fluidsynth failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        audio, sr = read_wav(wav)
    if sr != sample_rate:
        raise RuntimeError(f"fluidsynth wrote {sr} Hz instead of {sample_rate} Hz")
    mono = audio.mean(axis=0)
    total = round(seconds * sample_rate)
    return np.pad(mono, (0, max(0, total - mono.size)))[:total].astype(np.float32)


def render(
    notes: Sequence[Note],
    spec: ConceptSpec,
    seconds: float,
    *,
    sample_rate: int = 32000,
    renderer: str = "tinysoundfont",
    soundfont: str | None = None,
) -> np.ndarray:
    """Render note events to mono float32 ``[T]`` (T = round(seconds * sample_rate)), RMS-normalised to -20 dBFS
    with peaks kept under -1 dBFS and a 20-ms fade-out."""
    sf = check_renderer(renderer, soundfont)
    fn = _render_tinysoundfont if renderer == "tinysoundfont" else _render_fluidsynth
    audio = fn(notes, _programs(spec), seconds, sample_rate, sf).astype(np.float64)
    rms = float(np.sqrt(np.mean(audio**2)))
    if rms < 1e-6:
        raise RuntimeError(f"{renderer} rendered silence for {spec.name} with soundfont {sf}")
    audio *= 0.1 / rms
    peak = float(np.abs(audio).max())
    if peak > 0.89:
        audio *= 0.89 / peak
    fade = min(audio.size, int(0.02 * sample_rate))
    audio[audio.size - fade :] *= np.linspace(1.0, 0.0, fade)
    return audio.astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# WAV I/O (stdlib only, 16-bit PCM).
# --------------------------------------------------------------------------------------------------------------------


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """Write float audio ``[T]`` or ``[C, T]`` in [-1, 1] as 16-bit PCM."""
    a = np.atleast_2d(np.asarray(audio, dtype=np.float64))
    pcm = np.clip(np.round(a.T * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(a.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV as float32 ``[C, T]`` and its sample rate."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is read here (got {8 * w.getsampwidth()}-bit)")
        c, sr, n = w.getnchannels(), w.getframerate(), w.getnframes()
        data = np.frombuffer(w.readframes(n), dtype="<i2").reshape(-1, c).T
    return (data.astype(np.float32) / 32768.0), sr


# --------------------------------------------------------------------------------------------------------------------
# The dataset.
# --------------------------------------------------------------------------------------------------------------------


def concept_seed(name: str, base_seed: int, index: int) -> int:
    """Seed of composition `index` (0 = reference, 1.. = held-out) of concept `name`."""
    return (zlib.crc32(name.encode()) + 1_000_003 * base_seed + 7919 * index) % (2**31)


@dataclass
class Manifest:
    """A loaded manifest: ``root`` (its directory) plus the JSON fields; clip paths resolve against ``root``."""

    path: str
    data: dict = field(repr=False)

    @property
    def root(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    @property
    def sample_rate(self) -> int:
        return int(self.data["sample_rate"])

    @property
    def concepts(self) -> list[str]:
        return [c["name"] for c in self.data["concepts"]]

    def concept(self, name: str) -> dict:
        for c in self.data["concepts"]:
            if c["name"] == name:
                return c
        raise KeyError(f"concept {name!r} is not in {self.path} (it has {', '.join(self.concepts)})")

    def reference_path(self, name: str) -> str:
        return os.path.join(self.root, self.concept(name)["reference"]["path"])

    def heldout_paths(self, name: str) -> list[str]:
        return [os.path.join(self.root, h["path"]) for h in self.concept(name)["heldout"]]


def load_manifest(path: str) -> Manifest:
    """Read a manifest written by :func:`build` (a directory holding ``manifest.json`` works too)."""
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ppt_fast concept manifest (format {data.get('format')!r} != {FORMAT!r})")
    return Manifest(path, data)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(
    out_dir: str,
    *,
    concepts: Iterable[str] | None = None,
    seconds: float = 120.0,
    heldout: int = 4,
    heldout_seconds: float = 30.0,
    sample_rate: int = 32000,
    renderer: str = "tinysoundfont",
    soundfont: str | None = None,
    seed: int = 0,
) -> str:
    """Render the concept dataset into `out_dir` and return the manifest path (``out_dir/manifest.json``).

    Args:
        concepts: names from :data:`CONCEPTS` (default :data:`EVAL_CONCEPTS`: 8 timbres + 2 piano playing styles).
        seconds: reference clip length (the method's "two-minute reference").
        heldout / heldout_seconds: number and length of held-out clips (other compositions, same concept).
        sample_rate: WAV sample rate (32 kHz = MusicGen's). Clips are mono 16-bit PCM.
        renderer / soundfont: see the module docstring; a missing renderer or soundfont raises with an install hint.
        seed: base seed; each clip's composition seed is :func:`concept_seed` (name, seed, index).
    """
    names = list(EVAL_CONCEPTS) if concepts is None else list(concepts)
    unknown = [n for n in names if n not in CONCEPTS]
    if unknown or not names:
        raise ValueError(f"concepts={unknown or names!r}: choose from {', '.join(CONCEPTS)}")
    if seconds <= 0 or heldout_seconds <= 0 or heldout < 0:
        raise ValueError("seconds and heldout_seconds must be > 0 and heldout >= 0")
    sf = check_renderer(renderer, soundfont)
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for name in names:
        spec = CONCEPTS[name]
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        clips = []
        for index in range(heldout + 1):
            dur = seconds if index == 0 else heldout_seconds
            s = concept_seed(name, seed, index)
            rel = os.path.join(name, "reference.wav" if index == 0 else f"heldout_{index:02d}.wav")
            audio = render(compose(spec, s, dur), spec, dur, sample_rate=sample_rate, renderer=renderer, soundfont=sf)
            write_wav(os.path.join(out_dir, rel), audio, sample_rate)
            clips.append({"path": rel, "seed": s, "seconds": dur, "sha256": _sha256(os.path.join(out_dir, rel))})
            log.info("rendered %s (%.1f s, seed %d)", rel, dur, s)
        entries.append(
            {
                "name": name,
                "description": spec.description,
                "program": None if spec.is_drum else spec.program,
                "drums": spec.is_drum,
                "style": spec.style,
                "tags": list(spec.tags),
                "reference": clips[0],
                "heldout": clips[1:],
            }
        )
    manifest = {
        "format": FORMAT,
        "renderer": renderer,
        "soundfont": {
            "path": sf,
            "name": os.path.basename(sf),
            "licence": SOUNDFONT_LICENCES.get(os.path.basename(sf), "unknown: check the file's licence"),
            "sha256": _sha256(sf),
        },  # fmt: skip
        "sample_rate": sample_rate,
        "seed": seed,
        "concepts": entries,
        "versions": _versions(renderer),
    }
    path = os.path.join(out_dir, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
    return path


def _versions(renderer: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"numpy": np.__version__}
    for pkg in ("tinysoundfont", "pretty_midi") if renderer == "tinysoundfont" else ():
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if renderer == "fluidsynth":
        proc = subprocess.run(["fluidsynth", "--version"], capture_output=True, text=True, check=False)
        out["fluidsynth"] = (proc.stdout.splitlines() or ["?"])[0]
    return out
