"""Note events -> mono audio through a General MIDI soundfont (:func:`render`), plus the 16-bit PCM WAV I/O.

Renderers:

- ``tinysoundfont`` (default, pip only): the ``tinysoundfont`` wheel with the GM soundfont that ``pretty_midi`` ships
  (TimGM6mb.sf2, GPL-2). Sample-exact: the synth is stepped from note event to note event in Python.
- ``fluidsynth``: Debian's ``fluidsynth`` binary with ``fluid-soundfont-gm`` (FluidR3_GM.sf2, MIT); better sound.

A render depends only on (notes, spec, renderer, soundfont, sample rate, seconds): the same arguments give the same
samples on the same machine and library versions. numpy only (no torch).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads on first use (`ppt-fast --help` reads RENDERERS)
    import numpy as np

from .composer import DRUM_CHANNEL, ConceptSpec, Note

RENDERERS = ("tinysoundfont", "fluidsynth")
FLUID_R3 = "/usr/share/sounds/sf2/FluidR3_GM.sf2"

SOUNDFONT_LICENCES = {
    "TimGM6mb.sf2": "GPL-2.0 (TimGM6mb by Tim Brechbill, shipped in the pretty_midi wheel)",
    "FluidR3_GM.sf2": "MIT (FluidR3_GM by Frank Wen, Debian package fluid-soundfont-gm)",
}


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
    import numpy as np
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
    import numpy as np

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
    import numpy as np

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
    import numpy as np

    a = np.atleast_2d(np.asarray(audio, dtype=np.float64))
    pcm = np.clip(np.round(a.T * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(a.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV as float32 ``[C, T]`` and its sample rate."""
    import numpy as np

    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is read here (got {8 * w.getsampwidth()}-bit)")
        c, sr, n = w.getnchannels(), w.getframerate(), w.getnframes()
        data = np.frombuffer(w.readframes(n), dtype="<i2").reshape(-1, c).T
    return (data.astype(np.float32) / 32768.0), sr
