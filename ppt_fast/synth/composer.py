"""Seeded compositions: the concepts' instrument specs (:data:`CONCEPTS`) and note events from a seed (:func:`compose`).

A composition depends only on (spec, seed, seconds); :func:`concept_seed` derives a clip's seed from a concept name,
a base seed and an index. Rendering the notes to audio is :mod:`ppt_fast.synth.renderer`'s job. numpy only.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads on first use (`ppt-fast --help` reads CONCEPTS)
    import numpy as np

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
    import numpy as np

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
    import numpy as np

    rng = np.random.default_rng(seed)
    harmony = _Harmony(rng)
    return rng, harmony, float(rng.integers(spec.tempo[0], spec.tempo[1] + 1))


def composition_tempo(spec: ConceptSpec, seed: int) -> float:
    """The tempo (bpm) :func:`compose` picks for `spec` and `seed` (for text descriptions of rendered clips)."""
    return _start(spec, seed)[2]


def compose(spec: ConceptSpec, seed: int, seconds: float) -> list[Note]:
    """Note events of one composition for `spec` (deterministic in `seed`), covering `seconds`."""
    import numpy as np

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


def concept_seed(name: str, base_seed: int, index: int) -> int:
    """Seed of composition `index` (0 = reference, 1.. = held-out) of concept `name`."""
    return (zlib.crc32(name.encode()) + 1_000_003 * base_seed + 7919 * index) % (2**31)
