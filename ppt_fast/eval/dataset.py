"""A concept dataset rendered offline and deterministically from seeds: MIDI compositions -> General MIDI soundfont.

Each concept (an instrument timbre, or a playing style on a shared instrument) gets one reference clip (2 min by
default, what the method tunes on) and several held-out clips of *different compositions* (other seeds), which the
metrics use to check that an embedding follows the concept rather than the notes.

The compositions and the renderers (``tinysoundfont`` by default, ``fluidsynth``) are :mod:`ppt_fast.synth`'s; this
module writes their clips to disk with a manifest (:func:`build`) and reads the manifest back (:func:`load_manifest`).

Everything depends only on (concept, seed, renderer, soundfont, sample rate, seconds): the same arguments give the
same WAV bytes on the same machine and library versions. This module needs numpy only (no torch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..synth import CONCEPTS, SOUNDFONT_LICENCES, check_renderer, compose, concept_seed, render, write_wav

log = logging.getLogger(__name__)

FORMAT = "ppt_fast.concepts/1"

#: The concept dataset's default set (8 timbres + 2 piano playing styles); the rest of CONCEPTS feeds pretraining.
EVAL_CONCEPTS = ("piano", "violin", "nylon_guitar", "trumpet", "flute", "organ", "marimba", "drums", "piano_waltz",
                 "piano_arpeggios")  # fmt: skip


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
        renderer / soundfont: see :mod:`ppt_fast.synth.renderer`; a missing renderer or soundfont raises with an
            install hint.
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
